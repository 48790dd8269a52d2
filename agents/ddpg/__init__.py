"""AMC-style DDPG: the layer-walking environment, networks, replay, noise and the agent."""

from agents.ddpg.agent import DDPGAgent, DDPGConfig
from agents.ddpg.env import ActionWall, CompressionEnv, StepState

__all__ = ["ActionWall", "CompressionEnv", "DDPGAgent", "DDPGConfig", "StepState"]
