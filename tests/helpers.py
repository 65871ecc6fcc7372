"""Small shared builders for tests (tiny models with non-trivial outputs)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, vocab: int = 256, hidden: int = 64, layers: int = 2, std: float = 0.15):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init → peaked, input-dependent logits
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return m.eval()


def markov_tokens(n: int = 4096, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """A token stream with structure (a sparse random Markov chain)."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = [0]
    choice = torch.randint(0, 4, (n,), generator=g)
    for i in range(n - 1):
        out.append(int(nxt[out[-1], choice[i]]))
    return torch.tensor(out)


def make_smoke_inputs(wd, overlay_name: str = "smoke.yaml", **changes):
    """The smoke run's inputs in ``wd``: a tiny random Llama, a tiny news corpus and
    configs/smoke.yaml with absolute paths to them (plus top-level ``changes``). Returns the
    overlay's path."""
    from pathlib import Path

    import yaml

    from qbench.data.corpora import news_documents
    from qbench.models.tiny import make_tiny_llama

    wd = Path(wd)
    root = Path(__file__).resolve().parents[1]
    make_tiny_llama(wd / "tiny-llama", hidden=64, layers=2, seed=0)
    (wd / "tiny-corpus.txt").write_text("\n\n".join(news_documents()[:80]))
    overlay = yaml.safe_load((root / "configs" / "smoke.yaml").read_text())
    overlay["models"]["tiny"]["source"]["path"] = str(wd / "tiny-llama")
    overlay["corpora"]["tiny"]["source"]["path"] = str(wd / "tiny-corpus.txt")
    overlay.update(changes)
    (wd / overlay_name).write_text(yaml.safe_dump(overlay))
    return wd / overlay_name
