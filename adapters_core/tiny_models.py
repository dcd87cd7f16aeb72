"""Tiny, seeded, locally built base models and tokenizers.

Nothing here downloads anything. Each builder trains or constructs its artefact from a fixed seed and
writes it with ``save_pretrained`` so that every consumer goes through the real
``from_pretrained`` code path on a local directory. The same builders back the test-suite, the
benchmarks and the demo base model that ``adapterforge up`` creates on first start.

Two architectures cover the layer types the engine has to handle:

* a Llama-style decoder (``nn.Linear`` projections, grouped-query attention, SwiGLU MLP);
* a GPT-2-style decoder (``transformers.Conv1D`` projections, fused ``c_attn``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A small, fixed corpus: enough to learn a few hundred byte-level merges deterministically.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Parameter-efficient fine-tuning trains a small adapter on top of a frozen base model.",
    "Low-rank adaptation adds a product of two thin matrices to each targeted weight.",
    "What is the capital of France? The capital of France is Paris.",
    "What is two plus two? Two plus two is four.",
    "user: hello there! assistant: hello, how can I help you today?",
    "Adapters can be merged into the base weights, or served side by side in one batch.",
    "def add(a, b):\n    return a + b\n",
    "The rain in Spain stays mainly in the plain. 0123456789",
    "system: you are a helpful assistant. user: summarise this text. assistant: here is a summary.",
]


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape of the tiny Llama-style model (grouped-query attention: kv heads < heads)."""

    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 64
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class TinyGPT2Spec:
    """Shape of the tiny GPT-2-style model (Conv1D projections)."""

    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 256


def build_tokenizer(out_dir: str | Path, vocab_size: int = 384) -> Path:
    """Train a byte-level BPE tokenizer on a fixed corpus and save it with ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


def _token_ids(tok_dir: Path) -> tuple[int, dict[str, int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = {t: int(tok.get_vocab()[t]) for t in SPECIAL_TOKENS}
    return len(tok), ids


def build_tiny_llama(out_dir: str | Path, spec: TinyLlamaSpec | None = None, seed: int = 0) -> Path:
    """Build a seeded tiny ``LlamaForCausalLM`` plus tokenizer and save both to ``out_dir``."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    spec = spec or TinyLlamaSpec()
    out = build_tokenizer(out_dir)
    vocab, ids = _token_ids(out)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=ids["<|bos|>"],
        eos_token_id=[ids["<|eos|>"], ids["<|im_end|>"]],
        pad_token_id=ids["<|pad|>"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|bos|>"], eos_token_id=[ids["<|eos|>"], ids["<|im_end|>"]], pad_token_id=ids["<|pad|>"]
    )
    model.save_pretrained(out)
    _write_marker(out, "llama", seed)
    return out


def build_tiny_gpt2(out_dir: str | Path, spec: TinyGPT2Spec | None = None, seed: int = 0) -> Path:
    """Build a seeded tiny ``GPT2LMHeadModel`` (Conv1D layers) plus tokenizer in ``out_dir``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    spec = spec or TinyGPT2Spec()
    out = build_tokenizer(out_dir)
    vocab, ids = _token_ids(out)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_positions=spec.n_positions,
        bos_token_id=ids["<|bos|>"],
        eos_token_id=ids["<|eos|>"],
        pad_token_id=ids["<|pad|>"],
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(out)
    _write_marker(out, "gpt2", seed)
    return out


def _write_marker(out: Path, arch: str, seed: int) -> None:
    (out / "adapterforge_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}))


def ensure_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Return ``out_dir`` holding a tiny model of ``arch``, building it first if it is not there yet."""
    out = Path(out_dir)
    marker = out / "adapterforge_tiny.json"
    if marker.exists() and json.loads(marker.read_text()) == {"arch": arch, "seed": seed}:
        return out
    logger.info("building tiny %s base model in %s (seed %d)", arch, out, seed)
    if arch == "llama":
        return build_tiny_llama(out, seed=seed)
    if arch == "gpt2":
        return build_tiny_gpt2(out, seed=seed)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose 'llama' or 'gpt2'")
