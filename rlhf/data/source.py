"""A data source as a recipe names it: a local file or a hub dataset, with its format.

A hub source may also name the file of an offline copy (`local:`); a relative `local:` is
looked up in the data root (`data.root`, else the RLHF_DATA_ROOT environment variable). Hub
sources are validated by form, never fetched.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rlhf.data.formats import COMPARISON_FORMATS, SFT_FORMATS

DATA_FORMATS = ("auto", *SFT_FORMATS, *COMPARISON_FORMATS, "prompts")
DATA_ROOT_ENV = "RLHF_DATA_ROOT"
# `name` or `owner/name`, as the hub spells dataset ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_local_path(path: str) -> bool:
    """A hub id is `owner/name`; anything with a data extension or a path prefix is local."""
    p = path.lower()
    return (
        p.startswith(("/", "./", "../", "~"))
        or p.endswith((".jsonl", ".json", ".gz", ".parquet", ".csv"))
        or Path(path).exists()
    )


class DataSource(BaseModel):
    """A recipe's data source (unknown keys are errors, values are type-checked, as in every
    recipe section)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    path: str = Field(..., description="local .jsonl/.json/.parquet(.gz) file or a hub dataset id")
    format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    split: str = Field("train", description="split name, for hub datasets")
    data_dir: str | None = Field(None, description="hub datasets: subfolder (HH: harmless-base)")
    local: str | None = Field(
        None,
        description="hub datasets: a local copy, read instead of the hub when it exists; "
        f"a relative name is looked up in data.root (default ${DATA_ROOT_ENV})",
    )
    limit: int | None = Field(None, ge=1, description="use only the first N rows")
    drop_synthetic: bool = Field(True, description="OASST: drop machine-written replies")
    lang: str | None = Field(None, description="OASST: keep trees whose prompt is in this language")

    # The recipe key that holds this source (e.g. "reward.train"), for error messages.
    _key: str = ""

    @model_validator(mode="after")
    def _local_file_exists(self) -> DataSource:
        if looks_like_local_path(self.path):
            if not Path(self.path).exists():
                raise ValueError(f"data file not found: {self.path}")
        elif not _HUB_ID.match(self.path):
            raise ValueError(
                f"no such local data file as '{self.path}', and not a hub dataset id (owner/name)"
            )
        return self

    @property
    def key(self) -> str:
        return self._key
