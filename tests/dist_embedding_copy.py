"""Worker for tests/test_sharded.py: SFT's embedding-row copy (sft.init_token_embeddings, as
recipes/gemma3-270m.yaml sets it) on a model loaded the way the SFT stage loads it.

Run as `python -m tests.dist_embedding_copy MODEL_DIR OUT` (one rank) or under `accelerate
launch --config_file recipes/accelerate/zero3-cpu.yaml` (2 ranks): the accelerator is built
first, so under ZeRO-3 `from_pretrained` partitions the weights as it loads them
(deepspeed.zero.Init) and every parameter is an empty placeholder on each rank. MODEL_DIR holds
a tiny Gemma-3 with tied embeddings. Rank 0 writes to OUT the full embedding table after the
copy, and how many of its elements rank 0 held before gathering.
"""

import sys

import torch
from safetensors.torch import save_file

from rlhf.infra import distributed
from rlhf.infra.runtime import make_accelerator
from rlhf.recipe import Recipe
from rlhf.roles import models

SOURCES = {7: 3, 9: 1}  # dst -> src rows, as sft.token_embedding_sources gives them


def main(model_dir: str, out: str) -> None:
    accelerator = make_accelerator(Recipe(precision="fp32", seed=0))
    model = models.load_causal_lm(model_dir)
    table = model.get_input_embeddings().weight
    held = table.numel()  # ZeRO-3: 0, a placeholder; the full table otherwise
    models.copy_token_embeddings(model, SOURCES)
    with distributed.writable(accelerator, [table]):  # gathered, to read it whole
        full = table.detach().clone()
    tied = model.get_output_embeddings().weight is table
    if accelerator.is_main_process:
        save_file(
            {
                "embedding": full.contiguous(),
                "held": torch.tensor(held),
                "tied": torch.tensor(tied),
                "world_size": torch.tensor(accelerator.num_processes),
            },
            out,
            metadata={"sharding": distributed.sharding(accelerator)},
        )
    accelerator.wait_for_everyone()
    distributed.leave_process_group()  # every rank, before exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.exit(distributed.exit_code_of_rank(0))
