"""Pure tensor math: the PPO losses and KL control, advantage estimators, small statistics.

Nothing here loads a model, reads a file or touches an accelerator; tests/test_code_shape.py
keeps it that way (these modules import nothing from rlhf outside rlhf.algo).
"""
