"""Pure tensor math: every training loss, KL control, advantage estimators, small statistics.

    sft.py       next-token cross-entropy on labelled tokens (SFT)
    ranking.py   Bradley-Terry and the K-way ranking loss (reward model)
    dpo.py       the DPO loss and its variants (IPO, hinge, robust)
    ppo.py       PPO/GRPO's clipped policy and value losses, KL penalties and control
    advantages.py, stats.py

Nothing here loads a model, reads a file or touches an accelerator; tests/test_code_shape.py
keeps it that way (these modules import nothing from rlhf outside rlhf.algo).
"""
