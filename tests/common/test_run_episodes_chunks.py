"""The robot-side loop runs chunk policies with a receding horizon."""

import numpy as np

from common import client as client_lib
from common import two_goal


class FakeChunkPolicy:
    """Always returns the same (H=4, A=2) chunk whose rows differ, and counts requests."""

    def __init__(self, execute_horizon):
        self.metadata = {"action_spec": {"type": "chunk", "shape": [4, 2]},
                         "execute_horizon": execute_horizon}
        self.requests = 0
        self.chunk = np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4]], np.float32)

    def infer(self, obs):
        self.requests += 1
        return {"actions": self.chunk}


def test_chunk_policy_runs_first_k_actions_then_asks_again():
    policy = FakeChunkPolicy(execute_horizon=2)
    client_lib.run_episodes(policy, two_goal.ENV_ID, num_episodes=1, seed=0, max_steps=6)
    assert policy.requests == 3  # 6 steps, 2 actions per chunk


def test_single_action_policy_asks_every_step():
    class Single:
        metadata = {"action_spec": {"type": "box"}}
        requests = 0

        def infer(self, obs):
            Single.requests += 1
            return {"actions": np.zeros(2, np.float32)}

    client_lib.run_episodes(Single(), two_goal.ENV_ID, num_episodes=1, seed=0, max_steps=5)
    assert Single.requests == 5
