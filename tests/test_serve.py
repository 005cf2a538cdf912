"""``moesteer serve``: the real server in a child process, driven with the official ``openai`` client.

One server per module (the embedded model, a free 127.0.0.1 port, one alias, a data folder, steps
of 8 rows, so that concurrent requests' gangs of branch rows wait for each other) and
one in-process vLLM engine as the reference: ``lm.generate`` is what ``moesteer generate --backend
vllm`` runs (one test also runs that command). The module's last test stops the server with
SIGTERM. The flag and request checks at the end need no server.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")
httpx = pytest.importorskip("httpx")

from moesteer.cli.common import one_line, parse_strategy  # noqa: E402
from moesteer.sampling import SamplingParams  # noqa: E402
from moesteer.serve.aliases import AliasError, resolve_alias  # noqa: E402
from moesteer.serve.requests import ServeOptions, check_served, parse_aliases  # noqa: E402
from moesteer.strategies import spec  # noqa: E402
from moesteer.trace_file import TraceFile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Q: 12 + 7 * 3 = ?\n"
PROMPTS = [PROMPT, "Q: 5 * 6 - 4 = ?\n", "Q: 81 - 9 * 8 + 40 = ?\n"]
SCMOE = "scmoe(beta=0.5)"
ROE = "roe(samples=4, tau=0.25)"
MAX_TOKENS = 24
STARTUP_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A ``moesteer serve`` child process and its clients."""

    def __init__(self, data_dir: Path, log: Path, flags: tuple[str, ...] = ()) -> None:
        self.port, self.log, self.data_dir = _free_port(), log, data_dir
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        template = log.parent / "chat.jinja"  # the embedded model has none: a user turn as a plain prompt
        template.write_text("{% for message in messages %}{{ message['content'] }}{% endfor %}")
        command = [sys.executable, "-m", "moesteer", "serve", "--port", str(self.port)]
        command += ["--alias", f"scmoe={SCMOE}", "--data-dir", str(data_dir), "--chat-template", str(template)]
        command += ["--max-num-seqs", "8", "--max-num-batched-tokens", "256", *flags]  # concurrent gangs wait
        with log.open("w") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=300)
        self.children: list = []

    def wait(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"moesteer serve exited ({self.process.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    self.children = psutil.Process(self.process.pid).children(recursive=True)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        pytest.fail(f"moesteer serve did not answer /health in {STARTUP_S}s:\n{self.log.read_text()[-3000:]}")

    def complete(self, prompt: str = PROMPT, strategy: str | None = None, **kwargs):
        extra = {"return_token_ids": True, **kwargs.pop("extra_body", {})}
        if strategy is not None:
            extra["vllm_xargs"] = {**extra.get("vllm_xargs", {}), "moesteer": strategy}
        kwargs = {"model": "tiny-arith-moe", "max_tokens": MAX_TOKENS, "temperature": 0.0, **kwargs}
        return self.client.completions.create(prompt=prompt, extra_body=extra, **kwargs)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        for child in self.children:
            if child.is_running():
                child.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    folder = tmp_path_factory.mktemp("serve")
    (folder / "data").mkdir()
    running = Server(folder / "data", folder / "server.log")
    try:
        running.wait()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def lm():
    """The reference: the in-process vLLM engine ``moesteer generate --backend vllm`` builds. Kept
    for the whole session: vLLM's shutdown of an in-process engine, whenever the garbage collector
    runs it, destroys the process-wide parallel groups the later modules' engines use."""
    import moesteer

    return moesteer.load(None, backend="vllm")


def _reference(lm, prompt: str, strategy: str | None, **sampling) -> list:
    sampling = {"max_tokens": MAX_TOKENS, "temperature": 0.0, **sampling}
    return lm.generate([prompt], parse_strategy(strategy, ()), SamplingParams(**sampling))


def _tokens(response) -> list[tuple[list[int], str]]:
    return [(list(c.token_ids), c.text) for c in sorted(response.choices, key=lambda c: c.index)]


GREEDY = [None, "plain", "topk(1)", "mask(0, 3)", "ranks(2)", SCMOE, ROE]
SAMPLED = ["plain", SCMOE, ROE]


@pytest.mark.parametrize("strategy", GREEDY)
def test_greedy_tokens_equal_the_engines(server, lm, strategy):
    expected = [(c.token_ids, c.text) for c in _reference(lm, PROMPT, strategy)]
    assert _tokens(server.complete(strategy=strategy)) == expected


@pytest.mark.parametrize("strategy", SAMPLED)
def test_sampled_tokens_with_a_seed_and_n_equal_the_engines(server, lm, strategy):
    expected = [(c.token_ids, c.text) for c in _reference(lm, PROMPT, strategy, temperature=0.8, seed=3, n=2)]
    response = server.complete(strategy=strategy, temperature=0.8, seed=3, n=2)
    assert _tokens(response) == expected
    assert response.usage.completion_tokens == sum(len(ids) for ids, _ in expected)


def test_an_alias_is_its_spec(server, lm):
    expected = [(c.token_ids, c.text) for c in _reference(lm, PROMPTS[1], SCMOE)]
    response = server.complete(PROMPTS[1], model="tiny-arith-moe+scmoe")
    assert _tokens(response) == expected
    assert "tiny-arith-moe+scmoe" in [m.id for m in server.client.models.list().data]


def test_chat_is_steered_as_a_completion_of_the_rendered_prompt(server):
    expected = server.complete(strategy=SCMOE).choices[0].text
    for stream in (False, True):
        response = server.client.chat.completions.create(
            model="tiny-arith-moe",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            stream=stream,
            extra_body={"vllm_xargs": {"moesteer": SCMOE}},
        )
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in response if c.choices)
        else:
            text = response.choices[0].message.content
        assert text == expected


def test_the_generate_command_gives_the_same_tokens(server):
    command = [sys.executable, "-m", "moesteer", "generate", "--backend", "vllm", "--json", "--strategy", SCMOE]
    command += ["--temperature", "0.8", "--seed", "3", "--n", "2", "--max-tokens", str(MAX_TOKENS), PROMPT]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, check=True)
    expected = [(r["token_ids"], r["text"]) for r in map(json.loads, out.stdout.splitlines())]
    assert _tokens(server.complete(strategy=SCMOE, temperature=0.8, seed=3, n=2)) == expected


def test_controllers_equal_the_engines(server, lm):
    for strategy in ("self_consistency(roe(samples=2), n=3)", "best_of_n(n=2)"):
        expected = [(c.token_ids, c.text) for c in _reference(lm, PROMPT, strategy, temperature=0.7, seed=1)]
        assert _tokens(server.complete(strategy=strategy, temperature=0.7, seed=1)) == expected, strategy


def test_a_file_inside_the_data_dir_is_read(server, lm):
    traced = _reference(lm, PROMPTS[2], "ranks(2)")
    lm_trace = lm.generate([PROMPTS[2]], parse_strategy("ranks(2)", ()), SamplingParams(max_tokens=8), trace=True)
    path = TraceFile.of(lm_trace, lm, "ranks(2)").save(server.data_dir / "ranks2.json")
    replay = f"replay({str(path)!r})"
    expected = [(c.token_ids, c.text) for c in _reference(lm, PROMPTS[2], replay, max_tokens=8)]
    assert _tokens(server.complete(PROMPTS[2], strategy=replay, max_tokens=8)) == expected
    assert expected[0][0] == traced[0].token_ids[:8]


def test_8_concurrent_mixed_requests_each_equal_alone(server):
    requests = [
        (PROMPTS[0], None, {}),
        (PROMPTS[1], "topk(1)", {}),
        (PROMPTS[2], SCMOE, {}),
        (PROMPTS[0], ROE, {"temperature": 0.8, "seed": 1}),
        (PROMPTS[0], ROE, {"temperature": 0.8, "seed": 2}),
        (PROMPTS[1], "mask(0, 3)", {}),
        (PROMPTS[2], "plain", {"temperature": 0.8, "seed": 5, "n": 2}),
        (PROMPTS[1], SCMOE, {"temperature": 0.8, "seed": 7}),
    ]
    alone = [_tokens(server.complete(p, s, **kw)) for p, s, kw in requests]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)

    async def together():
        async def one(prompt, strategy, kwargs):
            extra = {"return_token_ids": True} | ({"vllm_xargs": {"moesteer": strategy}} if strategy else {})
            settings = {"max_tokens": MAX_TOKENS, "temperature": 0.0, **kwargs}
            return await client.completions.create(model="tiny-arith-moe", prompt=prompt, extra_body=extra, **settings)

        return await asyncio.gather(*(one(*r) for r in requests))

    assert [_tokens(r) for r in asyncio.run(together())] == alone
    assert alone[3] != alone[4]  # the two RoE seeds draw their own noise


@pytest.mark.parametrize(
    ("strategy", "sampling"), [(SCMOE, {}), (ROE, {}), (ROE, {"temperature": 0.8, "seed": 3, "n": 2})]
)
def test_streaming_equals_non_streaming_with_usage(server, strategy, sampling):
    whole = server.complete(strategy=strategy, **sampling)
    stream = server.complete(strategy=strategy, stream=True, stream_options={"include_usage": True}, **sampling)
    chunks = list(stream)
    for choice in whole.choices:
        deltas = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(d.text for d in deltas) == choice.text and len(deltas) > 1
        assert deltas[-1].finish_reason == choice.finish_reason
    tokens = sum(len(c.token_ids) for c in whole.choices)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == tokens


def test_a_client_leaving_mid_stream_leaves_the_server_healthy(server):
    before = _tokens(server.complete(strategy=SCMOE))
    stream = server.complete(strategy=SCMOE, stream=True, max_tokens=400, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    time.sleep(1)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert _tokens(server.complete(strategy=SCMOE)) == before


def _cli_message(strategy: str, lm) -> str:
    """What ``moesteer generate --strategy`` prints after ``error:`` for this spec."""
    try:
        lm.engine.check_strategy(parse_strategy(strategy, ()))
    except ValueError as err:
        return one_line(str(err))
    raise AssertionError(f"{strategy} was accepted")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("strategy", ["scmoe(beta=", "scmo", "mask(99)", "roe(samples=4, cache='clean')"])
def test_bad_specs_are_a_400_with_the_clis_line(server, lm, strategy, stream):
    with pytest.raises(openai.BadRequestError) as err:
        server.complete(strategy=strategy, stream=stream)
    assert err.value.body["message"] == _cli_message(strategy, lm)


@pytest.mark.parametrize(
    ("strategy", "kwargs", "words"),
    [
        (SCMOE, {"logprobs": 2}, "logprobs"),
        ("best_of_n(n=2)", {"stream": True}, "drop stream"),
        ("steermoe('/etc/passwd')", {}, "--data-dir"),
        ("capacity(1.0)", {}, "--allow capacity"),
        ("c3po('refs')", {}, "--allow gradients"),
        ("topk(1)", {"presence_penalty": 0.5}, "presence_penalty"),
        ("self_consistency(mask(99), n=2)", {}, "out of range"),
        ("des(n=4, verifier='prm')", {}, "verifier='prm'"),
        ("roe(samples=200)", {}, "200 rows"),
    ],
)
def test_requests_a_server_cannot_serve_are_a_400(server, strategy, kwargs, words):
    with pytest.raises(openai.BadRequestError) as err:
        server.complete(strategy=strategy, **kwargs)
    assert words in err.value.body["message"]


def test_an_unknown_alias_is_a_404_and_a_non_string_spec_a_400(server):
    with pytest.raises(openai.NotFoundError, match="unknown alias 'nope'"):
        server.complete(model="tiny-arith-moe+nope")
    with pytest.raises(openai.BadRequestError, match="spec string"):
        server.client.completions.create(
            model="tiny-arith-moe", prompt=PROMPT, max_tokens=4, extra_body={"vllm_xargs": {"moesteer": 3}}
        )
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_routed_experts_are_the_engines_trace(server, lm):
    (completion,) = lm.generate([PROMPT], spec.parse(SCMOE), SamplingParams(max_tokens=6), trace=True)
    response = server.complete(strategy=SCMOE, max_tokens=6, extra_body={"vllm_xargs": {"moesteer_trace": 1}})
    (choice,) = response.choices
    assert choice.token_ids == completion.token_ids
    experts = np.load(io.BytesIO(base64.b64decode(choice.model_extra["routed_experts"])))
    joined = completion.trace.joined(branch=0)
    prompt_len = len(lm.engine.encode(PROMPT))
    assert experts.shape == (prompt_len + len(completion.token_ids) - 1, len(joined), joined[1].experts.shape[-1])
    for i, layer in enumerate(sorted(joined)):
        assert (experts[:, i] == joined[layer].experts[0, : experts.shape[0]].numpy()).all()
    kept = httpx.get(f"{server.url}/v1/moesteer/traces/{response.id}", timeout=10)
    assert kept.status_code == 200
    path = server.data_dir.parent / "kept.json"
    path.write_text(kept.text)
    (traced,) = TraceFile.load(path).completions
    assert traced.text == completion.text and traced.trace.branches() == [0, 1]
    for branch in (0, 1):
        ours, theirs = traced.trace.joined(branch), completion.trace.joined(branch)
        for layer in joined:
            length = ours[layer].experts.shape[1]
            assert (ours[layer].experts == theirs[layer].experts[:, :length]).all()
            assert (ours[layer].weights - theirs[layer].weights[:, :length]).abs().max() < 1e-5
    assert httpx.get(f"{server.url}/v1/moesteer/traces/cmpl-none", timeout=10).status_code == 404


@pytest.mark.slow  # a second server
def test_branches_split_by_kv_cache_pressure_are_a_503_and_the_server_lives_on(tmp_path):
    # 34 KV blocks: four RoE rows growing past 300 tokens cannot all stay, vLLM preempts one
    small = Server(tmp_path, tmp_path / "server.log", ("--num-gpu-blocks-override", "34"))
    try:
        small.wait()
        with pytest.raises(openai.InternalServerError) as err:
            small.complete(strategy=ROE, max_tokens=300, extra_body={"ignore_eos": True})
        assert err.value.status_code == 503 and "branches" in err.value.message
        assert httpx.get(f"{small.url}/health", timeout=10).status_code == 200
        assert small.complete(strategy=SCMOE).choices[0].finish_reason in ("stop", "length")
    finally:
        small.stop()


@pytest.mark.slow  # a second server, with an HF copy of the model for gradients
def test_rerouting_served_with_allow_gradients_equals_the_engine(tmp_path, lm):
    allowed = Server(tmp_path, tmp_path / "server.log", ("--allow", "gradients"))
    try:
        allowed.wait()
        for strategy in ("rerouting(every=None)", "rerouting(every=8, steps=2)"):
            expected = [(c.token_ids, c.text) for c in _reference(lm, PROMPT, strategy)]
            assert _tokens(allowed.complete(strategy=strategy)) == expected, strategy
    finally:
        allowed.stop()


def test_sigterm_stops_the_server_mid_stream_within_60s_leaving_no_child(server):
    stream = server.complete(strategy=SCMOE, stream=True, max_tokens=400, extra_body={"ignore_eos": True})
    next(iter(stream))
    children = psutil.Process(server.process.pid).children(recursive=True)
    assert children
    start = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(60)
    assert time.monotonic() - start < 60
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.pid for p in alive]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)


# ---- without a server --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ("--data-parallel-size", "2"),
        ("--speculative-config", '{"method": "ngram"}'),
        ("--api-server-count", "2"),
        ("--headless",),
        ("--enable-return-routed-experts",),
        ("-O3",),
        ("--async-scheduling",),
        ("--logits-processors", "x:Y"),
    ],
)
def test_flags_steering_cannot_serve_are_refused_in_one_line(flags):
    from moesteer.lm import check_loadable
    from moesteer.serve.server import ServeCommand, parse_args

    with pytest.raises(ValueError) as err:
        parse_args(ServeCommand(check_loadable(None), "tiny", ServeOptions(), flags))
    assert "\n" not in str(err.value)


def test_aliases_data_files_and_opt_ins(tmp_path):
    assert parse_aliases(("a=scmoe(beta=0.5)",)) == {"a": "scmoe(beta=0.5)"}
    for bad in (("a",), ("=x",), ("a=scmoe", "a=plain")):
        with pytest.raises(ValueError):
            parse_aliases(bad)
    inside = tmp_path / "t.json"
    options = ServeOptions(data_dir=tmp_path)
    check_served(spec.parse(f"replay({str(inside)!r})"), options)
    with pytest.raises(ValueError, match="outside"):
        check_served(spec.parse(f"replay({str(tmp_path / '..' / 't.json')!r})"), options)
    with pytest.raises(ValueError, match="--allow capacity"):
        check_served(spec.parse("capacity(1.0)"), options)
    check_served(spec.parse("capacity(1.0)"), ServeOptions(allow=frozenset({"capacity"})))
    body = {"model": "m+a", "prompt": "x"}
    assert resolve_alias(body, "m", {"a": "topk(1)"}) and body["vllm_xargs"] == {"moesteer": "topk(1)"}
    assert body["model"] == "m"
    with pytest.raises(AliasError, match="give one of them"):
        resolve_alias({"model": "m+a", "vllm_xargs": {"moesteer": "plain"}}, "m", {"a": "topk(1)"})
    assert not resolve_alias({"model": "other+a"}, "m", {"a": "topk(1)"})


def test_the_trace_store_finds_a_responses_requests_and_keeps_the_last():
    from moesteer.serve import traces
    from moesteer.trace import RoutingTrace
    from moesteer.trace_file import TracedCompletion

    store = traces.TraceStore("m", 16, (1, 2))
    for key, sample in [("cmpl-a-1", 0), ("cmpl-a-0", 1), ("cmpl-a-0", 0), ("cmpl-ab-0", 0), ("chatcmpl-b", 0)]:
        store.add(key, "scmoe()", TracedCompletion(0, sample, key, RoutingTrace()))
    found = store.file("cmpl-a")
    assert [(c.prompt_index, c.sample_index, c.text) for c in found.completions] == [
        (0, 0, "cmpl-a-0"),
        (0, 1, "cmpl-a-0"),
        (1, 0, "cmpl-a-1"),
    ]
    assert [c.text for c in store.file("chatcmpl-b").completions] == ["chatcmpl-b"]
    assert store.file("cmpl") is None and found.strategy == "scmoe()"
    for i in range(traces.KEPT):
        store.add(f"x-{i}", "plain()", TracedCompletion(0, 0, "", RoutingTrace()))
    assert store.file("cmpl-a") is None and len(store.kept) == traces.KEPT


def test_alias_and_trace_endpoints_check_the_api_key():
    from types import SimpleNamespace

    from moesteer.serve.aliases import authorized

    def scope(keys, header):
        app = SimpleNamespace(state=SimpleNamespace(args=SimpleNamespace(api_key=keys)))
        return {"type": "http", "app": app, "headers": [(b"authorization", header)] if header else []}

    assert authorized(scope(None, None))
    assert authorized(scope(["k"], b"Bearer k"))
    assert not authorized(scope(["k"], b"Bearer x")) and not authorized(scope(["k"], None))
