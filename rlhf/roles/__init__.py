"""The models each stage trains or scores with: loading by role (`models`), the policy with its
value head (`actor_critic`), the reward model (`reward_model`), DPO's preference pairs
(`preference`), reward functions (`rewards`) and the PPO score built from them (`reward_sources`).
"""
