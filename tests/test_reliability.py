"""Evaluation integrity, numbers that cannot be trusted, one-line errors.

``BAD_INPUTS`` is the list of hostile or careless command lines; every one must end with exit
code 2 and exactly one ``error: ...`` line (the last line of stderr), never a traceback.
"""

from __future__ import annotations

import fcntl
import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from click.testing import CliRunner

import moesteer
from moesteer.cli import main
from moesteer.cli.generate import _print_completions
from moesteer.decoding import NonFiniteScores
from moesteer.evals.data import read_jsonl
from moesteer.evals.harness import MoesteerHarnessLM
from moesteer.evals.rundir import read_samples
from moesteer.evals.runner import EvalConfig, run
from moesteer.evals.tasks import get_task
from moesteer.evals.tuning import tuning_split
from moesteer.models.adapters import find_routers
from moesteer.routing import Bias, TopK
from moesteer.sampling import MAX_N, MAX_SEED, MAX_TOKENS, Completion, SamplingParams
from moesteer.strategies.spec import parse
from moesteer.strategy import Strategy, TokenStrategy
from moesteer.testing import save_tiny

PROMPT = "Q: 3 + 4 = ?\n"
RECORDS = [{"country": "France", "capital": "Paris"}, {"country": "Italy", "capital": "Rome"}]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _task(path: Path, prompt: str = "Q: capital of {country}?\\nA:", name: str = "capitals", data="caps.jsonl") -> str:
    data_text = json.dumps(data)
    path.write_text(f'name: {name}\ndata: {data_text}\nprompt: "{prompt}"\nanswer: capital\nmax_tokens: 2\n')
    return str(path)


@dataclass
class World:
    """Files the cases point at: a vLLM-loadable tiny model, broken copies of it, task files, runs."""

    root: Path
    model: str
    held: list = field(default_factory=list)  # open lock files of the "busy directory" case

    def path(self, name: str) -> Path:
        return self.root / name

    def fresh(self, name: str) -> Path:
        """A new empty folder (cases that write must not see each other's runs)."""
        folder = self.root / "fresh" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def eval(self, *args: str) -> list[str]:
        return ["eval", "--model", self.model, "--max-tokens", "2", *args]

    def finished_run(self, name: str) -> tuple[Path, Path]:
        """A finished two-problem run of the capitals task on its own data copy: (data, run dir)."""
        folder = self.fresh(name)
        data = _jsonl(folder / "caps.jsonl", RECORDS)
        task = _task(folder / "t.yaml")
        result = _run(*self.eval("--task", task, "--output", str(folder / "out")))
        assert result.exit_code == 0, result.output
        return data, folder / "out" / "capitals" / "plain"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("reliability")
    model = save_tiny(root / "model", "qwen3_moe", hidden_size=128, head_dim=32)
    for broken, cut in (("truncated", lambda b: b[: len(b) // 2]), ("corrupt", lambda b: b"garbage" * 64)):
        shutil.copytree(model, root / broken)
        weights = root / broken / "model.safetensors"
        weights.write_bytes(cut(weights.read_bytes()))
    _jsonl(root / "caps.jsonl", RECORDS)
    (root / "empty.jsonl").write_text("")
    (root / "dups.jsonl").write_text('{"id": 1, "country": "A", "capital": "a"}\n\n{"id": "1", "country": "B"}\n')
    _task(root / "good.yaml")
    _task(root / "missing_field.yaml", "Q: capital of {city}?")
    _task(root / "positional.yaml", "Q: capital of {0}?")
    _task(root / "escape.yaml", name="../../evil")
    _task(root / "dups.yaml", data="dups.jsonl")
    (root / "syntax.yaml").write_text("name: capitals\ndata: caps.jsonl\nprompt: [unclosed\n")
    return World(root, str(model))


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _busy(w: World) -> list[str]:
    out = w.fresh("busy")
    (out / "capitals" / "plain").mkdir(parents=True)
    handle = open(out / "capitals" / "plain" / ".lock", "w")  # noqa: SIM115 (another eval holds it open)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    w.held.append(handle)
    return w.eval("--task", str(w.path("good.yaml")), "--output", str(out))


def _edited_data(w: World) -> list[str]:
    data, run_dir = w.finished_run("edited")
    _jsonl(data, [RECORDS[0], {**RECORDS[1], "capital": "Milan"}])
    return w.eval("--task", str(data.parent / "t.yaml"), "--output", str(run_dir.parent.parent))


def _corrupt_samples(w: World) -> list[str]:
    data, run_dir = w.finished_run("corrupt-samples")
    lines = (run_dir / "samples.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "samples.jsonl").write_text('{"id": "1", "trunc\n' + lines[1])
    return w.eval("--task", str(data.parent / "t.yaml"), "--output", str(run_dir.parent.parent))


def _generate(*args: str) -> Callable[[World], list[str]]:
    return lambda w: ["generate", "--model", w.model, "--max-tokens", "3", *args, PROMPT]


def _eval(*args: str) -> Callable[[World], list[str]]:
    return lambda w: w.eval("--task", "arith", "--limit", "1", "--output", str(w.fresh("eval")), *args)


def _tune(*args: str) -> Callable[[World], list[str]]:
    return lambda w: ["tune", "--model", w.model, "--strategy", "scmoe", "-s", "beta=0,0.5", *args]


def _custom(task_file: str) -> Callable[[World], list[str]]:
    return lambda w: w.eval("--task", str(w.path(task_file)), "--output", str(w.fresh("custom")))


def _lm_eval(model_args: str) -> Callable[[World], list[str]]:
    return lambda w: ["lm-eval", "--model", "moesteer", "--model_args", f"pretrained={w.model},{model_args}"]


# (case, command line, what the one error line must say)
BAD_INPUTS: list[tuple[str, Callable[[World], list[str]], str]] = [
    # part 4: devices, model directories, pictures, counts, task files, lm-eval, usage
    ("device cuda:7", _generate("--device", "cuda:7"), "device 'cuda:7' is not available here"),
    ("device banana", _generate("--device", "banana"), "device 'banana' is not a torch device"),
    ("truncated safetensors", lambda w: ["generate", "--model", str(w.path("truncated")), PROMPT], "truncated"),
    ("corrupt safetensors", lambda w: ["generate", "--model", str(w.path("corrupt")), PROMPT], "corrupt"),
    ("compare --plot missing folder", lambda w: ["compare", str(w.root), "--plot", "/nope/a.png"], "does not exist"),
    ("compare --plot unknown suffix", lambda w: ["compare", str(w.root), "--plot", str(w.root / "a.xyz")], "suffix"),
    ("inspect --out unknown suffix", lambda w: ["inspect", "--model", w.model, PROMPT, "--out", "u.txt"], "suffix"),
    ("demo --limit 0", lambda w: ["demo", "--limit", "0"], "'--limit': 0 is not in the range"),
    ("eval --batch-size -1", _eval("--batch-size", "-1"), "'--batch-size': -1 is not in the range"),
    ("task {field} records lack", _custom("missing_field.yaml"), "lacks field 'city'"),
    ("task positional {0}", _custom("positional.yaml"), "prompt field {0} must name a record field"),
    ("task YAML syntax error", _custom("syntax.yaml"), "invalid YAML"),
    ("task name escapes --output", _custom("escape.yaml"), "name '../../evil' must be"),
    ("lm-eval bad spec", _lm_eval("strategy=scmoe(bet=1)"), "did you mean 'beta'"),
    ("lm-eval unknown model arg", _lm_eval("stratgy=scmoe(beta=1)"), "did you mean 'strategy'"),
    ("unknown global option", lambda w: ["--verbose", "generate", PROMPT], "No such option"),
    ("unknown command option", _generate("--temprature", "1"), "No such option"),
    ("unknown command", lambda w: ["generat", PROMPT], "No such command"),
    ("eval --temperature -1", _eval("--temperature", "-1"), "temperature"),
    ("generate --top-k -1", _generate("--top-k", "-1"), "'--top-k': -1 is not in the range"),
    # part 2: splits, ids, run directories, data, counts
    ("eval --split banana", _eval("--split", "banana"), "has no split 'banana'"),
    ("eval gsm8k --split validation", lambda w: ["eval", "--task", "gsm8k", "--split", "validation"], "no split"),
    ("tune without validation split", _tune("--task", "gsm8k"), "has no validation split"),
    ("tune --split test", _tune("--task", "arith", "--split", "test"), "use validation"),
    ("tune --split banana", _tune("--task", "arith", "--split", "banana"), "has no split 'banana'"),
    ("duplicate ids 1 and '1'", _custom("dups.yaml"), "lines 1 and 3 have the same id '1'"),
    ("eval --data empty file", _eval("--data", "EMPTY"), "has no records"),
    ("eval --data missing file", _eval("--data", "/nope/x.jsonl"), "does not exist"),
    ("second eval into a busy dir", _busy, "is in use by another moesteer eval"),
    ("resume over edited data", _edited_data, "data_sha256"),
    ("corrupt non-last sample line", _corrupt_samples, "samples.jsonl:1: corrupt sample line"),
    ("eval --max-tokens 0", _eval("--max-tokens", "0"), "'--max-tokens': 0 is not in the range"),
    ("eval --max-tokens -3", _eval("--max-tokens", "-3"), "'--max-tokens': -3 is not in the range"),
    ("eval --limit 0", _eval("--limit", "0"), "'--limit': 0 is not in the range"),
    ("eval --limit -1", _eval("--limit", "-1"), "'--limit': -1 is not in the range"),
    ("tune --limit -1", _tune("--task", "arith", "--limit", "-1"), "'--limit': -1 is not in the range"),
    ("tune --max-tokens 0", _tune("--task", "arith", "--max-tokens", "0"), "'--max-tokens': 0 is not in the range"),
    ("tune --trials 0", _tune("--task", "arith", "--trials", "0"), "'--trials': 0 is not in the range"),
    ("eval --n 0", _eval("--n", "0"), "'--n': 0 is not in the range"),
    ("generate --n 5000", _generate("--n", "5000"), f"'--n': 5000 is not in the range 1<=x<={MAX_N}"),
    ("generate --max-tokens 0", _generate("--max-tokens", "0"), "'--max-tokens': 0 is not in the range"),
    # part 3: non-finite scores, bounds, specs, seeds, stops
    ("scmoe(beta=1e39)", _generate("--strategy", "scmoe(beta=1e39)"), "non-finite next-token scores at step 0"),
    ("roe(samples=100000)", _generate("--strategy", "roe(samples=100000)"), "samples must be an integer in 1..256"),
    ("roe skip > MoE layers", _generate("--strategy", "roe(skip=2)"), "skip must be at most 1"),
    ("self_consistency n too big", _generate("--strategy", "self_consistency(n=5000)"), "n must be an integer in"),
    ("duplicated spec keyword", _generate("--strategy", "scmoe(beta=1, beta=2)"), "'beta' is given twice"),
    ("**{} in a spec", _generate("--strategy", "scmoe(**{})"), "unsupported **{}"),
    ("seed 2**32", _generate("--seed", str(2**32)), f"0<=x<={MAX_SEED}"),
    ("seed -1", _eval("--seed", "-1"), f"0<=x<={MAX_SEED}"),
    ('--stop ""', _generate("--stop", ""), "stop=('',) must be non-empty strings"),
    # search controllers
    ("des m > n", _generate("--strategy", "des(n=4, m=9)"), "des: m must be an integer in 1..4"),
    ("des ks beyond the experts", _generate("--strategy", "des(n=4, ks=(1, 40))"), "ks has 40, but the model has"),
    ("des unknown verifier", _generate("--strategy", "des(verifier='prn')"), "did you mean 'prm'"),
    (
        "des PRM that is not a PRM",
        lambda w: _generate("--strategy", f"des(n=4, verifier='prm', verifier_model={w.model!r})")(w),
        "is not a process reward model",
    ),
    # routing optimisers
    ("c3po missing set", _generate("--strategy", "c3po('no/such/refs')"), "no reference set at no/such/refs"),
    ("c3po alpha_search 1", _generate("--strategy", "c3po('r', alpha_search=1)"), "alpha_search must be 0"),
    ("rerouting negative steps", _generate("--strategy", "rerouting(steps=-1)"), "rerouting: steps must be"),
    ("rerouting lr 0", _generate("--strategy", "rerouting(lr=0)"), "lr must be a positive number"),
    ("rerouting every 0", _generate("--strategy", "rerouting(every=0)"), "rerouting: every must be"),
    ("rerouting layers 1.5", _generate("--strategy", "rerouting(layers=1.5)"), "fraction in (0, 1]"),
]


@pytest.mark.parametrize(("case", "command", "message"), BAD_INPUTS, ids=[c for c, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(world, case, command, message):
    args = [str(world.path("empty.jsonl")) if a == "EMPTY" else a for a in command(world)]
    result = _run(*args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2, (case, result.output, result.exception)
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr
    assert message in errors[0], errors[0]
    assert "Traceback" not in result.output


def test_vllm_validation_errors_are_one_line(world, monkeypatch):
    """A prompt vLLM refuses and a configuration it refuses: one line each, not a pydantic dump;
    non-finite scores raised from vLLM's combiner leave its engine usable."""
    lm = moesteer.load(world.model, backend="vllm")
    monkeypatch.setattr("moesteer.cli.common.load", lambda *args, **kwargs: lm)
    result = _run("generate", "--backend", "vllm", "--model", world.model, "x" * 600)
    assert result.exit_code == 2 and result.stderr.splitlines()[-1].startswith("error: vLLM refused the request")
    with pytest.raises(NonFiniteScores, match=r"scmoe\(beta=1e\+39\) gave non-finite next-token scores at step 0"):
        lm.generate([PROMPT], parse("scmoe(beta=1e39)"), max_tokens=3)
    assert lm.generate([PROMPT], parse("scmoe(beta=0.5)"), max_tokens=3)[0].num_tokens == 3
    with pytest.raises(ValueError, match="vLLM refused the configuration: User-specified max_model_len") as err:
        moesteer.load(world.model, backend="vllm", max_model_len=10**9)
    assert "\n" not in str(err.value)


# ---- part 4: the boundary keeps tracebacks for --debug and for real bugs ---------------------------------


def test_debug_shows_the_traceback(world):
    result = _run("--debug", "generate", "--model", world.model, "--device", "banana", PROMPT)
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)


def test_real_bugs_keep_their_traceback(world, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("moesteer.cli.generate.read_prompts", broken)
    result = _run("generate", "--model", world.model, PROMPT)
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_steer_rolls_back_a_partial_patch(world):
    lm = moesteer.load(world.model)
    model, routers = lm.model, list(find_routers(lm.model, lm.adapter).values())
    user_patch = routers[-1].forward = lambda hidden: None  # someone else's patch on the last router
    with pytest.raises(ValueError, match="already has a patched forward"), moesteer.steer(model, TopK(1)):
        pass
    assert all("forward" not in vars(r) for r in routers[:-1])
    assert routers[-1].forward is user_patch


# ---- part 2: evaluation integrity ----------------------------------------------------------------------


def test_splits_are_declared_and_honoured(world, tmp_path):
    arith = get_task("arith")
    assert tuning_split(arith) == "validation" and tuning_split(get_task("gsm8k"), "test") == "test"
    config = EvalConfig(task="arith", split="validation", model=world.model, limit=2, max_tokens=1)
    run(config, tmp_path / "val", progress=False)
    assert [s["id"] for s in read_samples(tmp_path / "val" / "samples.jsonl").values()] == [
        "arith-validation-0",
        "arith-validation-1",
    ]
    _jsonl(tmp_path / "dev.jsonl", RECORDS[:1])
    _jsonl(tmp_path / "caps.jsonl", RECORDS)
    task = get_task(_task(tmp_path / "t.yaml", data={"validation": "dev.jsonl", "test": "caps.jsonl"}))
    assert task.splits == ("validation", "test") and len(task.load("validation")) == 1
    tuned = _run(
        "tune", "--task", str(tmp_path / "t.yaml"), "--model", world.model, "--strategy", "scmoe", "-s", "beta=0"
    )
    assert tuned.exit_code == 0 and "1 validation problems" in tuned.stderr, tuned.output


def test_records_without_id_get_their_line_number(tmp_path):
    records = read_jsonl(_jsonl(tmp_path / "a.jsonl", [RECORDS[0], {"id": "x", **RECORDS[1]}]))
    assert [r["id"] for r in records] == ["1", "x"]
    with pytest.raises(ValueError, match="id must be a string or an integer"):
        read_jsonl(_jsonl(tmp_path / "b.jsonl", [{"id": None}]))


def test_task_paths_stay_under_output(world, tmp_path, monkeypatch):
    (tmp_path / "t").mkdir()
    _jsonl(tmp_path / "t" / "caps.jsonl", RECORDS)
    task = _task(tmp_path / "t" / "t.yaml")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for given, output in ((task, "out"), ("../t/t.yaml", "out2")):
        result = _run(*world.eval("--task", given, "--output", output))
        assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("results.json")) == [
        Path("work/out/capitals/plain/results.json"),
        Path("work/out2/capitals/plain/results.json"),
    ]


def test_config_is_written_only_after_every_argument_is_valid(world, tmp_path):
    config = EvalConfig(task="arith", model=world.model, limit=1, max_tokens=1, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        run(config, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        run(EvalConfig(task="arith", model=world.model, limit=1), tmp_path / "b", batch_size=0, progress=False)
    with pytest.raises(OSError, match="cannot load model"):
        run(EvalConfig(task="arith", model=str(world.path("corrupt")), limit=1), tmp_path / "c", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not (tmp_path / "c" / "config.json").exists()
    # a directory without samples holds no run: a corrected configuration may start there
    run(EvalConfig(task="arith", model=world.model, limit=1, max_tokens=1), tmp_path / "c", progress=False)
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert saved["max_tokens"] == 1 and len(saved["data_sha256"]) == 64


def test_torn_last_sample_line_is_tolerated(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"id": "a", "correct": true}\n{"id": "b", "cor')
    assert list(read_samples(path)) == ["a"] and path.read_text().endswith("cor")
    assert list(read_samples(path, repair=True)) == ["a"] and path.read_text() == '{"id": "a", "correct": true}\n'
    path.write_text('not json\n{"id": "a"}\n')
    with pytest.raises(ValueError, match=r"samples.jsonl:1: corrupt sample line"):
        read_samples(path)


def test_tune_honours_max_tokens_and_unsafe_exec(world, monkeypatch):
    import moesteer.evals.tuning as tuning

    seen, real = [], tuning.evaluate

    def evaluate(lm, task, strategy, sampling, *rest):
        seen.append(sampling)
        return real(lm, task, strategy, sampling, *rest)

    monkeypatch.setattr(tuning, "evaluate", evaluate)
    monkeypatch.setattr("moesteer.evals.sandbox.allow_unsafe_exec", lambda allowed=True: seen.append(allowed))
    args = ["--task", "arith", "--limit", "1", "--max-tokens", "3", "--method", "grid", "--unsafe-exec"]
    result = _run(*_tune(*args)(world))
    assert result.exit_code == 0, result.output
    assert seen[0] is True and {s.max_tokens for s in seen[1:]} == {3}


def test_lm_eval_model_arguments_are_checked():
    with pytest.raises(ValueError, match="did you mean 'strategy'"):
        MoesteerHarnessLM.create_from_arg_string("stratgy=scmoe(beta=0.5)")


# ---- part 3: numbers that cannot be trusted are not reported -------------------------------------------


class MaskEverything(Strategy, TokenStrategy):
    name: ClassVar[str] = "mask_everything"

    def branches(self):
        return (None,)

    def combine(self, logprobs):
        return torch.full_like(logprobs[:, 0], float("-inf"))

    def spec(self) -> str:
        return "mask_everything()"


@pytest.mark.parametrize(
    "strategy",
    [MaskEverything(), "nan_bias", "inf_bias", parse("scmoe(beta=1e39)")],
    ids=["masks every token", "NaN bias", "inf bias", "scmoe(beta=1e39)"],
)
def test_non_finite_scores_raise_naming_strategy_and_step(world, strategy):
    lm = moesteer.load(world.model)
    if isinstance(strategy, str):
        experts = int(next(iter(find_routers(lm.model, lm.adapter).values())).num_experts)
        strategy = Bias(torch.full((experts,), float("nan" if strategy == "nan_bias" else "inf")))
    with pytest.raises(NonFiniteScores, match=r"gave non-finite next-token scores at step 0"):
        lm.generate([PROMPT], strategy, max_tokens=3)


def test_json_output_is_strict_json(capsys):
    completion = Completion(0, 0, "t", [1, 2], [-0.5, -math.inf], "length")
    _print_completions([completion], "plain()", as_json=True)

    def refuse(constant):
        raise ValueError(constant)

    record = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert record["logprobs"] == [-0.5, None]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SamplingParams(seed=2**32), "seed"),
        (lambda: SamplingParams(seed=-1), "seed"),
        (lambda: SamplingParams(n=MAX_N + 1), "n="),
        (lambda: SamplingParams(max_tokens=MAX_TOKENS + 1), "max_tokens"),
        (lambda: SamplingParams(stop=("",)), "non-empty"),
        (lambda: EvalConfig(task="arith", seed=2**32), "seed"),
        (lambda: EvalConfig(task="arith", max_tokens=0), "max_tokens"),
        (lambda: parse("roe(samples=257)"), "samples must be an integer in 1..256"),
        (lambda: parse("self_consistency(n=1025)"), "n must be an integer in 1..1024"),
        (lambda: parse("topk(k=1, k=1)"), "given twice"),
        (lambda: parse("roe(**{'samples': 2})"), "unsupported **"),
        (lambda: moesteer.steer(torch.nn.Linear(1, 1), None, seed=2**32).__enter__(), "steer(seed)"),
    ],
)
def test_parameter_bounds(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()
    assert parse("roe(samples=256)").samples == 256 and SamplingParams(seed=MAX_SEED).seed == MAX_SEED
