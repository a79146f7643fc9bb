"""Token sequences as every stage and tool sees them: chat templates and loss masks (`chat`),
padding and position conventions (`sequences`), decoding settings (`decoding`), SFT packing."""
