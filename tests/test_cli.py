"""The CLI on a tiny random Qwen2-MoE (dense layer 0, MoE layers 1 and 2) saved with a char tokenizer."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import moesteer
from moesteer.cli import JSON_FIELDS, main
from moesteer.strategies import catalog, spec
from moesteer.testing import save_tiny

PROMPT = "Q: 3 + 4 = ?\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("tiny-qwen2-moe"), "qwen2_moe"))


@pytest.fixture(scope="module")
def lm(model_dir) -> moesteer.LM:
    return moesteer.load(model_dir)


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_generate_prints_only_the_text(model_dir, lm):
    result = _run("generate", "--model", model_dir, "--max-tokens", "8", PROMPT)
    assert result.exit_code == 0, result.stderr
    expected = lm.generate([PROMPT], max_tokens=8)[0].text
    assert result.stdout == expected + "\n"
    assert "tokens/s" in result.stderr


def test_generate_json_has_every_field(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Q: 5 * 6 = ?\n"}) + "\n\n")
    args = ["--max-tokens", "5", "--temperature", "1", "--n", "2", "--json", "--trace"]
    result = _run("generate", "--model", model_dir, *args, "--prompts", str(prompts), PROMPT)
    assert result.exit_code == 0, result.stderr
    records = _json_lines(result.stdout)
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in records:
        assert set(r) == {*JSON_FIELDS, "strategy"}
        assert r["strategy"] == "plain()"
        assert len(r["token_ids"]) == len(r["logprobs"]) <= 5
    assert "layer 1:" in result.stderr and "layer 2:" in result.stderr


def test_param_shorthand_equals_inline_spec(model_dir):
    common = ["generate", "--model", model_dir, "--max-tokens", "6", "--json", PROMPT]
    shorthand = _json_lines(_run(*common, "--strategy", "topk", "-p", "k=1").stdout)
    inline = _json_lines(_run(*common, "--strategy", "topk(k=1)").stdout)
    assert shorthand[0]["strategy"] == inline[0]["strategy"] == "topk(k=1)"
    assert shorthand[0]["token_ids"] == inline[0]["token_ids"]


def test_bad_strategy_name_suggests_the_right_one(model_dir):
    result = _run("generate", "--model", model_dir, "--strategy", "topkk", PROMPT)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "did you mean 'topk'" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "topk", "-p", "kk=1"], "did you mean 'k'"),
        (["--strategy", "topk", "-p", "k"], "expected KEY=VALUE"),
        (["--strategy", "topk", "-p", "k=1", "-p", "k=2"], "given twice"),
        (["--strategy", "topk(k=1)", "-p", "k=2"], "bare strategy name"),
        (["-p", "k=1"], "name it with --strategy"),
        (["--strategy", "topk", "-p", "k=0"], "k must be an integer >= 1"),
        (["--strategy", "topk(k=99)"], "exceeds the number of experts"),
        (["--top-p", "2"], "top_p"),
        (["--dtype", "float13"], "dtype 'float13'"),
        (["--prompts", "missing.jsonl"], "not found"),
        (["--backend", "vllm", "--device", "cuda:0"], "is for backend hf"),
    ],
)
def test_user_mistakes_are_one_line_errors(model_dir, args, message):
    result = _run("generate", "--model", model_dir, *args, PROMPT)
    assert result.exit_code == 2
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "Traceback" not in result.output


def test_missing_model_and_empty_prompts(tmp_path):
    missing = _run("generate", "--model", str(tmp_path / "nowhere"), PROMPT)
    assert missing.exit_code == 2 and missing.stderr.startswith("error: cannot load model")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for args in (["--prompts", str(empty)], []):
        result = _run("generate", *args)
        assert result.exit_code == 2 and result.stderr.startswith("error: no prompts")


def test_strategies_table_fits_100_columns_and_names_each_paper():
    result = _run("strategies")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert max(len(line.encode()) for line in lines) <= 100  # bytes, as `awk '{print length}'` counts
    rows = {line.split()[0]: line.split(maxsplit=3) for line in lines[2:]}
    assert sorted(rows) == spec.names()  # one line each
    assert lines[0].split()[:3] == ["name", "level", "arXiv"]
    assert rows["topk"][1:3] == ["routing", "—"] and rows["plain"][1] == "token" and rows["des"][1] == "sequence"
    papers = {"steermoe": "2509.09660", "rice": "2505.14681", "topp": "2403.07652", "capacity": "2503.05066"}
    for name, arxiv in {**papers, "scmoe": "2405.14507", "roe": "2509.17238", "c3po": "2504.07964"}.items():
        assert rows[name][2] == arxiv, name
    wide = _run("strategies", "--wide").stdout
    assert "Steering MoE LLMs via Expert (De)Activation (Fayyaz et al., arXiv 2509.09660)" in wide


def test_strategies_name_shows_every_parameter_with_its_meaning():
    result = _run("strategies", "scmoe")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert "paper: Unchosen Experts Can Contribute Too (Shi et al., arXiv 2405.14507)" in lines
    for name in ("beta", "alpha", "weak", "rank", "weak_k", "ban_eos"):
        (at,) = [i for i, line in enumerate(lines) if line.startswith(f"  {name}: ")]
        assert lines[at + 1].startswith("      ") and len(lines[at + 1].split()) >= 3, name  # its meaning
    assert "  beta: float = 0.5" in lines and "  refs: str  (required)" in _run("strategies", "c3po").stdout
    example = lines[lines.index("example:") + 1]
    assert example.startswith('  moesteer generate --strategy "scmoe(')
    unknown = _run("strategies", "scmo")
    assert unknown.exit_code == 2 and "did you mean 'scmoe'" in unknown.stderr


def test_every_registered_strategy_documents_its_parameters_and_a_parsing_example():
    for e in catalog.entries():
        assert all(p.meaning for p in e.parameters), (e.name, [p.name for p in e.parameters if not p.meaning])
        assert spec.parse(e.example).spec().startswith(f"{e.name}("), e.example  # a valid spec of this strategy
        assert e.summary and e.level in ("routing", "token", "sequence")


def test_inspect_writes_a_png_and_summarises_every_moe_layer(model_dir, lm, tmp_path):
    out = tmp_path / "usage.png"
    result = _run("inspect", "--model", model_dir, "--max-tokens", "4", PROMPT, "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summarised = [int(line.split()[1].rstrip(":")) for line in result.stdout.splitlines() if line.startswith("layer")]
    assert summarised == list(lm.moe_layers) == [1, 2]
    bad_out = _run("inspect", "--model", model_dir, PROMPT, "--out", str(tmp_path / "no" / "usage.png"))
    assert bad_out.exit_code == 2 and bad_out.stderr.startswith("error: ") and "cannot write" in bad_out.stderr


@pytest.mark.parametrize("command", [[], ["generate"], ["strategies"], ["inspect"], ["demo"]])
def test_help(command):
    result = _run(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output or not command


def test_help_is_complete_for_generate():
    options = _run("generate", "--help").output
    for flag in ("--strategy", "-p", "--temperature", "--top-p", "--top-k", "--max-tokens", "--seed", "--n", "--stop"):
        assert flag in options
    for flag in ("--dtype", "--device", "--chat", "--prompts", "--json", "--trace", "--backend", "--model"):
        assert flag in options
