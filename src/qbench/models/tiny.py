"""A tiny random-init Llama for tests and smoke runs (builds in well under a second).

``make_tiny_llama(out_dir)`` writes a prepared model directory exactly like
:func:`qbench.models.loading.prepare_model` does (safetensors + tokenizer + model card), so all
downstream code paths can be exercised in seconds. Defaults: hidden 64, 2 layers, 4 heads /
2 KV heads (GQA, like SmolLM2), FFN 128; every dimension divisible by 32 and 64 so group-wise
quantization with groups 32/64 works.

Tokenizer: with ``vocab_from=<model dir>`` that model's tokenizer is copied (and its vocab size
used); otherwise a small byte-level BPE is trained offline, deterministically, on the built-in
text below (every byte is in the alphabet, so any text encodes), with SmolLM2's special tokens
(``<|endoftext|>`` = 0 unk, ``<|im_start|>`` = 1 bos, ``<|im_end|>`` = 2 eos/pad) and a ChatML
chat template.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .loading import atomic_dir, model_card, write_card

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TRAIN_TEXT = """\
 = Quantization =

Quantization maps a large set of values to a smaller set. In neural networks the weights and
activations of a model are stored with fewer bits, for example eight, four, three or two bits
instead of sixteen. The model becomes smaller and faster, and its quality drops a little.

 = = Weight quantization = =

Round to nearest quantization chooses a scale and a zero point for each output channel or for each
group of sixty four input channels. The values are divided by the scale, rounded to the nearest
integer and clipped to the range of the integer type. GPTQ uses second order information from a
small calibration set to correct the rounding error of the remaining weights, one column at a time.
AWQ searches for per channel scales that protect the weights seen with large activations.

 = = Activation quantization = =

Activations have outliers: a few channels are much larger than the others. SmoothQuant moves part
of that difficulty from the activations to the weights with a per channel smoothing factor, which
is folded into the preceding layer norm. LLM.int8 keeps the outlier columns in sixteen bit floating
point and computes the rest in eight bit integers.

 = = Key and value cache = =

During generation the keys and values of every previous token are stored in a cache. For long
contexts this cache is larger than the model. KIVI quantizes keys per channel and values per token
and keeps a small window of recent tokens in full precision. KVQuant quantizes keys before the rotary
embedding with non uniform codebooks and keeps a few outliers in a sparse matrix.

 = Perplexity =

Perplexity is the exponential of the average negative log likelihood of the next token. It is
measured on non overlapping windows of two thousand and forty eight tokens of a held out text, such
as the test split of WikiText. A lower perplexity is better. The first token of the text has no
context and is not scored. Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096.

The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. How much wood
would a woodchuck chuck if a woodchuck could chuck wood? Hello, world! What is your name? My name is
Tiny Llama, and I am a very small language model that knows nothing at all.
"""


def build_tiny_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE ``PreTrainedTokenizerFast``, trained offline and deterministically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_TRAIN_TEXT.splitlines(keepends=True), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<|endoftext|>", bos_token="<|im_start|>",
        eos_token="<|im_end|>", pad_token="<|im_end|>", model_max_length=1 << 30)
    tok.chat_template = CHATML_TEMPLATE
    return tok


def make_tiny_llama(out_dir: str | Path, *, vocab_from: str | Path | None = None, hidden: int = 64,
                    layers: int = 2, heads: int = 4, kv_heads: int = 2, ffn: int = 128,
                    seed: int = 0, tie_word_embeddings: bool = True,
                    max_position_embeddings: int = 4096) -> Path:
    """Build a random-init ``LlamaForCausalLM`` (deterministic for ``seed``) and write it as a
    prepared model directory at ``out_dir`` (atomically, with ``qbench_model_card.json``)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden={hidden} must be divisible by heads={heads}, "
                         f"and heads by kv_heads={kv_heads}")
    tok = AutoTokenizer.from_pretrained(vocab_from) if vocab_from is not None else build_tiny_tokenizer()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        architectures=["LlamaForCausalLM"])
    cfg.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
        # Non-trivial norms, so smoothing/folding bugs do not hide behind all-ones gains.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    source = {"kind": "tiny", "vocab_from": str(vocab_from) if vocab_from is not None else None,
              "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "ffn": ffn,
              "seed": seed, "tie_word_embeddings": tie_word_embeddings}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        h = hashlib.sha256()
        with open(tmp / "model.safetensors", "rb") as f:
            h.update(f.read())
        write_card(tmp, model_card(model, source, h.hexdigest(), tmp))
    return Path(out_dir)


__all__ = ["make_tiny_llama", "build_tiny_tokenizer", "CHATML_TEMPLATE", "SPECIAL_TOKENS"]
