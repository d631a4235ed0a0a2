"""The Hugging Face transformers integration (linmix.hf): Auto classes, save/load through
safetensors, generate() against linmix's own decoding, the cache, the labels loss, the tokenizer
and `linmix export` end to end with the README's four lines."""

import importlib.metadata
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import linmix.hf.auto  # noqa: E402, F401  (registers the Auto classes)
from _paths import SHARED_DATA_DIR, TINY_SHAKESPEARE  # noqa: E402
from linmix.cli import main  # noqa: E402
from linmix.data import CharTokenizer, train_sentencepiece  # noqa: E402
from linmix.hf import LinmixCache, LinmixConfig, LinmixForCausalLM, LinmixTokenizer  # noqa: E402
from linmix.hf.modeling import CACHE_FIELD  # noqa: E402
from linmix.models import LMConfig, build, build_from_spec, build_model, generate  # noqa: E402
from linmix.train import load_checkpoint, save_checkpoint  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
README_FOLDER = "hf/kops-ts-v2"  # the folder the README's Hugging Face section exports to
TINY_TRAIN = ["--set", "d_model=16", "--set", "n_k2=1", "--set", "rank=4", "--set", "context_length=32",
              "--max-steps", "2", "--warmup-steps", "1", "--batch-size", "4", "--eval-interval", "2",
              "--eval-batch-size", "256", "--eval-random-iters", "1", "--no-progress"]


def tiny_kstack():
    """K-Stack with a shared dense Kbase: window 32."""
    return build("kops-ts-v2", d_model=16, n_k2=2, rank=4, context_length=32)


def tiny_lm(mixer: str, **mixer_kwargs):
    return build_model("lm", LMConfig(vocab_size=65, mixer=mixer, d_model=16, n_layers=2, context_length=32,
                                      mixer_kwargs=mixer_kwargs))


MODELS = {
    "kstack": tiny_kstack,
    "kstack-adaptive": lambda: build("kops-ts-v2", d_model=16, n_k2=1, rank=4, context_length=32, head="adaptive",
                                     adaptive_cutoffs=(20, 40)),
    "gdn": lambda: tiny_lm("gdn", n_heads=2, use_gate=False),
    "k2": lambda: tiny_lm("k2", rank=4, kbase="toeplitz"),
    "gka": lambda: tiny_lm("gka", n_heads=2, use_gate=False),
    "attention": lambda: tiny_lm("attention", n_heads=2),
}


def wrap(model) -> LinmixForCausalLM:
    """The transformers model holding `model`'s weights, in eval mode."""
    hf = LinmixForCausalLM(LinmixConfig.from_model(model))
    hf.linmix.load_state_dict(model.state_dict())
    return hf.eval()


@pytest.fixture(autouse=True)
def shared_data(monkeypatch):
    monkeypatch.setenv("LINMIX_DATA_DIR", str(SHARED_DATA_DIR))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """best.pt of a 2-step `linmix train` run of a tiny kops-ts-v2."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LINMIX_DATA_DIR", str(SHARED_DATA_DIR))
        assert main(["train", "--preset", "kops-ts-v2", *TINY_TRAIN, "--out", str(out)]) == 0
    return out / "best.pt"


def export(*argv: str) -> int:
    """Run `linmix export ARGV`."""
    return main(["export", *argv])


def test_auto_classes_know_linmix():
    torch.manual_seed(0)
    config = AutoConfig.for_model("linmix", linmix_spec=LinmixConfig.from_model(tiny_kstack()).linmix_spec)
    assert type(config) is LinmixConfig and config.vocab_size == 65 and config.hidden_size == 16
    assert type(AutoModelForCausalLM.from_config(config)) is LinmixForCausalLM
    with pytest.raises(ValueError, match="model kind must be one of"):
        LinmixConfig(linmix_spec={"kind": "nope", "config": {}})


@pytest.mark.parametrize("name", ["kstack", "gdn"])
def test_save_and_load_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = wrap(MODELS[name]())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is LinmixForCausalLM and not loaded.training
    fresh_buffers, loaded_buffers = dict(model.named_buffers()), dict(loaded.named_buffers())
    assert all(torch.equal(fresh_buffers[name], loaded_buffers[name]) for name in fresh_buffers)
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    idx = torch.randint(0, 65, (2, 20))
    assert torch.equal(model(idx).logits, loaded(idx).logits)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        kernels = [key for key in weights.keys() if "kernel" in key]
    if name == "kstack":  # the shared Kbase is stored once and shared again after loading
        assert kernels == ["linmix.shared_kernel.weight"]
        assert all(block.mixer.kernel is loaded.linmix.shared_kernel for block in loaded.linmix.k2_blocks)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.generate(idx, max_new_tokens=3, do_sample=False).shape == (2, 23)


@pytest.mark.parametrize("name", ["kstack", "gdn", "k2", "gka", "attention"])
def test_greedy_generate_equals_linmix_decoding(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    prompt = torch.randint(0, 65, (2, 5))
    new_tokens = 40  # 45 tokens: past the window (32) of the dense K-Stack and attention
    expected = generate(model, prompt, new_tokens, temperature=0)
    assert torch.equal(wrap(model).generate(prompt, max_new_tokens=new_tokens, do_sample=False), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("preset", ["kops-ts-v2", "gdn-ts"])
def test_gpu_greedy_generate_equals_linmix_decoding(preset, dtype):
    """The presets at full size on CUDA (the delta rule's Triton kernels): 300 tokens, past the K-Stack's window."""
    torch.manual_seed(0)
    model = build(preset).to("cuda", dtype).eval()
    prompt = torch.randint(0, 65, (2, 20), device="cuda")
    expected = generate(model, prompt, 300, temperature=0)
    hf_model = wrap(model).to("cuda", dtype)
    assert torch.equal(hf_model.generate(prompt, max_new_tokens=300, do_sample=False), expected)


def test_generate_truncates_a_prompt_longer_than_the_window_as_linmix_does():
    torch.manual_seed(0)
    model = tiny_kstack().eval()
    prompt = torch.randint(0, 65, (1, 40))
    expected = generate(model, prompt, 6, temperature=0)
    assert torch.equal(wrap(model).generate(prompt, max_new_tokens=6, do_sample=False), expected)


def test_beam_search_through_the_cache_equals_beam_search_without_it():
    torch.manual_seed(0)
    model = wrap(MODELS["gdn"]())
    prompt = torch.randint(0, 65, (3, 5))
    beams = dict(max_new_tokens=12, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(prompt, **beams), model.generate(prompt, **beams, use_cache=False))


def test_generate_continues_from_a_returned_cache():
    torch.manual_seed(0)
    model = MODELS["gdn"]().eval()
    prompt = torch.randint(0, 65, (2, 5))
    hf_model = wrap(model)
    first = hf_model.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = getattr(first, CACHE_FIELD)
    more = hf_model.generate(first.sequences, **{CACHE_FIELD: cache}, max_new_tokens=5, do_sample=False)
    assert torch.equal(more, generate(model, prompt, 10, temperature=0))


def test_cache_memory_is_constant_per_token_for_a_linear_mixer():
    torch.manual_seed(0)
    model = wrap(MODELS["gdn"]())
    cache = getattr(model(torch.randint(0, 65, (2, 8)), use_cache=True), CACHE_FIELD)
    assert isinstance(cache, LinmixCache) and cache.recent is None
    sizes = []
    for _ in range(30):
        model(torch.randint(0, 65, (2, 1)), cache=cache)
        sizes.append(cache.memory_bytes())
    assert cache.get_seq_length() == 38 and len(set(sizes)) == 1


@pytest.mark.parametrize("name", ["kstack", "kstack-adaptive", "gdn"])
def test_labels_loss_equals_linmix_loss(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    idx = torch.randint(0, 65, (2, 24))
    _, expected = model(idx[:, :-1], idx[:, 1:])
    loss = wrap(model)(idx, labels=idx).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    ignored = idx.clone()
    ignored[:, 12:] = -100  # transformers' ignore index: only targets 1..11 count
    _, expected_part = model(idx[:, :11], idx[:, 1:12])
    torch.testing.assert_close(wrap(model)(idx, labels=ignored).loss, expected_part, rtol=1e-5, atol=1e-5)


def test_forward_refuses_padding_and_embeddings():
    model = wrap(MODELS["gdn"]())
    idx = torch.randint(0, 65, (2, 6))
    with pytest.raises(ValueError, match="no padding"):
        model(idx, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(idx, inputs_embeds=torch.zeros(2, 6, 16))


def test_tokenizer_wraps_char_and_sentencepiece_tokenizers(tmp_path):
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")[:20000]
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    sample = "ROMEO: What say you, sir?"
    for linmix_tokenizer in (CharTokenizer(sorted(set(text))), train_sentencepiece(tmp_path / "train.txt", 200)):
        folder = tmp_path / linmix_tokenizer.kind
        LinmixTokenizer(meta=linmix_tokenizer.to_meta()).save_pretrained(folder)
        (folder / "config.json").write_text(json.dumps({"model_type": "linmix"}))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert type(tokenizer) is LinmixTokenizer and len(tokenizer) == linmix_tokenizer.vocab_size
        ids = tokenizer(sample)["input_ids"]
        assert ids == linmix_tokenizer.encode(sample)
        assert tokenizer.decode(ids) == linmix_tokenizer.decode(ids)


def test_export_cli_end_to_end_and_the_readme_lines(checkpoint, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export("--ckpt", str(checkpoint), "--out", str(out)) == 0
    assert str(out) in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json",
            "linmix_tokenizer.json", "README.md"} <= {path.name for path in out.iterdir()}
    stored = load_checkpoint(checkpoint)
    card = (out / "README.md").read_text()
    assert "kops-ts-v2" in card and f"step {stored['step']}" in card and f"{stored['metric']['ppl']:.4f}" in card

    model = build_from_spec(stored["meta"]["model"])
    model.load_state_dict(stored["model"])
    prompt = torch.tensor([CharTokenizer(stored["meta"]["vocab"]).encode("ROMEO:")])
    expected = generate(model, prompt, 40, temperature=0)
    hf_model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(hf_model.generate(prompt, max_new_tokens=40, do_sample=False), expected)

    readme_lines = python_block(README.read_text().split("## Hugging Face", 1)[1])
    assert len(readme_lines.strip().splitlines()) == 4
    for lines in (readme_lines.replace(README_FOLDER, str(out)), python_block(card)):
        exec(compile(lines, "README", "exec"), {})
        assert capsys.readouterr().out.startswith("ROMEO:")


def python_block(markdown: str) -> str:
    """The first ```python block of `markdown`."""
    return re.search(r"```python\n(.*?)```", markdown, re.DOTALL).group(1)


def export_error(capsys, *argv: str) -> str:
    """The one-line error of `linmix export ARGV`, which must exit with code 2."""
    capsys.readouterr()
    assert export(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("linmix export: error: ") and err.count("\n") == 1
    return err


def test_export_errors(checkpoint, tmp_path, capsys):
    assert re.search("missing|no such|not found|does not exist",
                     export_error(capsys, "--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path / "a")))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert re.search("holds files already.*--force",
                     export_error(capsys, "--ckpt", str(checkpoint), "--out", str(tmp_path / "full")))
    assert export("--ckpt", str(checkpoint), "--out", str(tmp_path / "full"), "--force") == 0
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    foreign = tmp_path / "foreign.pt"
    save_checkpoint({"model": {}, "step": 0, "config": {}}, foreign)
    assert "not written by `linmix train`" in export_error(capsys, "--ckpt", str(foreign), "--out", str(tmp_path / "b"))


@pytest.mark.parametrize("installed, message", [
    ({"safetensors": "0.8.0"}, "needs transformers: pip install 'linmix[hf]'"),
    ({"transformers": "4.57.1", "safetensors": "0.8.0"}, "needs transformers 5.17 or a later 5.x, found 4.57.1"),
])
def test_export_names_the_extra_to_install(tmp_path, monkeypatch, capsys, installed, message):
    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert message in export_error(capsys, "--ckpt", str(tmp_path / "best.pt"), "--out", str(tmp_path / "hf"))
