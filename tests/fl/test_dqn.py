"""The double DQN: it learns a clear signal that random selection cannot use."""

from __future__ import annotations

import numpy as np
import pytest

from dtune.fl import DoubleDQN, DQNConfig, ProactiveSelector, RandomSelector, RoundFeedback
from tests.fl._helpers import context


def toy_rounds(selector, rounds=150, seed=0):
    """40 candidates a round; a client is valid iff its true time, the forecast give or take 20%,
    fits the 30 s deadline and it stays online (with the forecast probability). Returns the valid
    fraction of each round."""
    rng = np.random.default_rng(seed)
    fractions = []
    for r in range(rounds):
        forecast = rng.uniform(5.0, 60.0, size=40)
        p_online = rng.uniform(0.3, 1.0, size=40)
        ctx = context(
            forecast,
            k=5,
            forecasts=forecast,
            p_available=p_online,
            round=r,
            num_samples=rng.integers(5, 50, 40),
        )
        true_time = forecast * np.exp(0.2 * rng.standard_normal(40))
        stays = rng.random(40) < p_online
        picked = np.asarray(selector.select(ctx))
        valid = (true_time[picked] <= 30.0) & stays[picked]
        selector.feedback(
            RoundFeedback(
                round=r,
                deadline_s=30.0,
                selected=picked,
                valid=valid,
                dropped=~stays[picked],
                duration_s=np.where(stays[picked], true_time[picked], np.inf),
                utility=np.full(len(picked), np.nan),
                accuracy_gain=0.0,
                latency_s=30.0,
            )
        )
        fractions.append(valid.mean())
    return np.array(fractions)


def test_dqn_improves_on_random_on_a_toy_with_a_clear_signal():
    learned = toy_rounds(ProactiveSelector(seed=0))
    random = toy_rounds(RandomSelector(seed=0))
    assert learned[-50:].mean() > random[-50:].mean() + 0.25
    assert learned[-50:].mean() > learned[:10].mean()  # it learned: better late than early


def test_double_dqn_learns_expected_rewards_of_a_bandit():
    agent = DoubleDQN(2, DQNConfig(gamma=0.0, updates_per_round=50, lr=3e-3), seed=0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        states = rng.random((64, 2)).astype(np.float32)
        actions = rng.integers(0, 2, 64)
        rewards = actions * states[:, 0]  # selecting pays the first feature; skipping nothing
        agent.remember(states, actions, rewards, states, np.ones(64, bool))
        agent.learn()
    probe = np.column_stack([np.linspace(0, 1, 11), np.full(11, 0.5)])
    advantage = agent.q_values(probe) @ np.array([-1.0, 1.0])
    assert np.corrcoef(advantage, probe[:, 0])[0, 1] > 0.95
    assert agent.choose(probe, k=3).tolist()  # something is chosen
    chosen = DoubleDQN(2, DQNConfig(epsilon_start=0.0, epsilon_end=0.0), seed=0)
    chosen.online.load_state_dict(agent.online.state_dict())
    assert sorted(chosen.choose(probe, k=3).tolist()) == [8, 9, 10]


def test_exploration_decays_with_the_rounds_the_agent_has_played():
    agent = DoubleDQN(3, DQNConfig(epsilon_start=0.5, epsilon_end=0.1, epsilon_rounds=4), seed=0)
    states = np.zeros((6, 3))
    epsilons = []
    for _ in range(6):
        epsilons.append(agent.epsilon())
        agent.choose(states, k=2)
    assert epsilons == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1, 0.1])


def test_a_trained_agent_can_be_carried_into_a_new_selector():
    first = ProactiveSelector(seed=0)
    toy_rounds(first, rounds=60)
    carried = ProactiveSelector(seed=1, agent=first.agent)
    assert carried.agent is first.agent
    assert carried.agent.epsilon() == pytest.approx(first.agent.config.epsilon_end)
    with pytest.raises(ValueError, match="The agent sees 3 features, but must see 8"):
        ProactiveSelector(seed=0, agent=DoubleDQN(3, seed=0))
