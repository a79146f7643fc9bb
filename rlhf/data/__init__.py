"""The data layer: every file format the three stages read, as canonical examples.

    load_sft(source)          -> LoadResult[SFTExample]   (messages | prompt_completion | alpaca)
    load_comparisons(source)  -> LoadResult[Ranking]      (pairs | rankings | hh | oasst)
    load_prompts(source)      -> LoadResult[Prompt]       (prompts, or the prompts of the above)
    split_by_prompt(items, eval_fraction, seed) -> (train, eval)
    load_train_eval(recipe, stage, kind)  -> (train, eval)   (a stage's train / eval / eval_fraction)
    check_lengths(items, tokenizer, max_length, on_invalid) -> (kept, skipped)
    fit_prompts(items, tokenizer, max_length, recipe.data)  -> kept (the stages' check)

A source is a recipe `DataSource` or a plain path / hub id (format detected). Bad rows stop
with "file:line: what is wrong", or with on_invalid="skip" are counted in `.skipped`.
"""

from rlhf.data.lengths import check_lengths, fit_prompts
from rlhf.data.loaders import (
    as_source,
    load_comparisons,
    load_prompts,
    load_sft,
    load_train_eval,
)
from rlhf.data.split import split_by_prompt
from rlhf.data.types import LoadResult, Message, Prompt, Ranking, SFTExample

__all__ = [
    "LoadResult",
    "Message",
    "Prompt",
    "Ranking",
    "SFTExample",
    "as_source",
    "check_lengths",
    "fit_prompts",
    "load_comparisons",
    "load_prompts",
    "load_sft",
    "load_train_eval",
    "split_by_prompt",
]
