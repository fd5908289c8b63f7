"""Nothing an input contains can forge what sfckpt prints: terminal, GitHub Actions, JSON.

Real checkpoints (tiny models trained with schedulefree) whose tensor names, file name and
hyper-parameters are hostile go through every command in every output mode; the output must
hold no raw control character, no workflow command but sfckpt's own, only strict JSON, a step
summary whose markdown renders as sfckpt wrote it, and one `error:` line on exit 2.
"""
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import trainers
from conftest import assert_one_error_line
from sfckpt import textout

HOSTILE = [
    "fc1.weight\n::error file=README.md::X",
    "fc1.weight\x1b]0;owned title\x07",  # OSC: sets the terminal's title
    "fc1.bias\x1b[2J",  # CSI: clears the screen
    "c1\u009b31mred",  # U+009B: the one-character CSI
    "over\rwrite",
    "\n::set-output name=passed::true",
    "\r::warning::w",
    "\n::add-mask::secret",
    "\n\n### ✅ sfckpt check",
    "x`<img src=x onerror=alert(1)>`",  # in a one-backtick span, the first backtick would close it
    "evil\u202egnp.exe",  # RIGHT-TO-LEFT OVERRIDE: shows as "evilexe.png"
    "::error::at a line's start",
    "mid ##[error]legacy command",
    "tab\there\x7f\u2028",
]
UNTRAINED = 4  # the first names go to parameters no gradient reaches: inspect and convert name them
CKPT_NAME = "run\x1b[31m\n::error::file\u202e.pt"  # the checkpoint's own file name
RELEASE_NAME = "rel`<img src=x onerror=alert(1)>\n\n### ✅ sfckpt check\r::notice::{}.safetensors"  # an output's and a release's
MODES = ("terminal", "json", "github")
# what no printed text may hold: C0 but the line-ending \n, DEL, C1, line separators, bidi controls, surrogates
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
OWN_COMMANDS = ("::error title=sfckpt::", "::error title=sfckpt check::")


def _no_constant(token):
    raise ValueError(f"{token} is not JSON")


class Net(nn.Module):
    """Linear layers after parameters that no gradient reaches (first in the state dict and in the
    optimizer's groups; x = y for them, and sfckpt lists them as untrained)."""

    def __init__(self, n_names):
        super().__init__()
        self.spare = nn.ParameterList([nn.Parameter(torch.randn(3)) for _ in range(UNTRAINED)])
        self.layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range((n_names - UNTRAINED) // 2)])

    def forward(self, inp):
        return self.layers(inp)


def _train(tmp_path, names, poison=None, name=CKPT_NAME):
    """Net trained with AdamWScheduleFree in two groups (lr NaN in one, weight decay +inf in the other, as
    saved), its tensors renamed to `names` in order, `poison` (an untrained one) filled with NaN;
    returns (path, x by name)."""
    model = Net(len(names))
    params = list(model.parameters())
    opt = trainers.train(model, "adamw", steps=3, param_groups=[{"params": params[:6]}, {"params": params[6:]}])
    x = trainers.eval_x(model, opt)
    sd, osd = model.state_dict(), opt.state_dict()
    osd["param_groups"][0]["lr"] = math.nan
    osd["param_groups"][1]["weight_decay"] = math.inf
    renamed = dict(zip(sd, names))
    weights = {renamed[k]: v for k, v in sd.items()}
    if poison is not None:
        weights[poison] = weights[poison].clone().fill_(math.nan)
    path = tmp_path / name
    torch.save({"model": weights, "optimizer": osd}, path)
    return path, {renamed[k]: v for k, v in x.items()}


@pytest.fixture
def hostile(tmp_path):
    return _train(tmp_path, HOSTILE)


@pytest.fixture
def invoke(run, monkeypatch, tmp_path):
    """Run a command in a mode; returns (result, step summary text or None)."""

    def call(mode, *args):
        monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
        monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
        summary = tmp_path / "summary.md"
        summary.unlink(missing_ok=True)
        if mode == "github":
            summary.write_text("")
            monkeypatch.setenv("GITHUB_ACTIONS", "true")
            monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
        result = run(*args, *(["--json"] if mode == "json" else []))
        assert_printed_safely(result, mode)
        return result, summary.read_text(encoding="utf-8") if mode == "github" else None

    return call


def assert_printed_safely(result, mode):
    for stream in (result.stdout, result.stderr):
        assert not RAW.search(stream), RAW.search(stream)
        assert "##[" not in stream
        for line in stream.split("\n"):
            if line.lstrip().startswith("::"):
                assert mode == "github" and line.startswith(OWN_COMMANDS), line
    if mode == "json":
        json.loads(result.stdout, parse_constant=_no_constant)


def annotation_form(name):
    """A name as it appears in an annotation: the terminal form, then GitHub's data escaping."""
    return textout.terminal(name).replace("%", "%25")


# ---- every command, every mode -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_inspect_of_hostile_names(hostile, invoke, tmp_path, mode):
    ckpt, _ = _train(tmp_path, HOSTILE, poison=HOSTILE[0], name="poisoned.pt")
    result, _ = invoke(mode, "inspect", ckpt, "--scan")
    assert result.exit_code == 0
    if mode == "json":
        report = json.loads(result.stdout)
        assert list(report["nonfinite"]["tensors"]) == [HOSTILE[0]]  # JSON keeps the real name
        assert report["mapping"]["untrained_parameters"] == HOSTILE[:UNTRAINED]
        assert [g["lr"] for g in report["groups"]] == ["NaN", 0.02]
        assert [g["weight_decay"] for g in report["groups"]] == [0.01, "Infinity"]
    else:
        assert all(textout.terminal(n) in result.stdout for n in HOSTILE[:UNTRAINED])
    result, _ = invoke(mode, "inspect", hostile[0])
    assert result.exit_code == 0 and (mode == "json" or textout.terminal(CKPT_NAME) in result.stdout)


@pytest.mark.parametrize("mode", MODES)
def test_convert_of_hostile_names_is_exact_and_prints_them_escaped(hostile, invoke, tmp_path, mode):
    ckpt, x = hostile
    out = tmp_path / RELEASE_NAME.format(mode)
    result, _ = invoke(mode, "convert", ckpt, out)
    assert result.exit_code == 0
    got = load_file(str(out))
    assert sorted(got) == sorted(x) and all(torch.equal(got[n], x[n]) for n in x)
    if mode == "json":
        assert json.loads(result.stdout)["outputs"] == [str(out)]
    else:
        assert result.stderr.startswith(f"wrote {textout.terminal(str(out))} (adamw; ")


@pytest.mark.parametrize("mode", MODES)
def test_convert_refusal_names_the_tensor_on_one_line(invoke, tmp_path, mode):
    ckpt, _ = _train(tmp_path, HOSTILE, poison=HOSTILE[0])
    result, _ = invoke(mode, "convert", ckpt, tmp_path / "x.safetensors")
    assert_one_error_line(result, github=mode == "github")
    assert textout.terminal(HOSTILE[0]) in result.stderr
    assert not (tmp_path / "x.safetensors").exists()
    if mode == "json":
        assert HOSTILE[0] in json.loads(result.stdout)["error"]["message"]
    if mode == "github":
        assert annotation_form(HOSTILE[0]) in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("mode", MODES)
def test_diff_of_hostile_names(hostile, invoke, mode):
    ckpt, x = hostile
    result, _ = invoke(mode, "diff", ckpt, "--top", "0")
    assert result.exit_code == 0
    if mode == "json":
        assert sorted(t["name"] for t in json.loads(result.stdout)["tensors"]) == sorted(x)
    else:
        assert all(textout.log_text(textout.terminal(n)) in result.stdout for n in HOSTILE)


@pytest.fixture
def releases(hostile, run, tmp_path):
    """(checkpoint, its x released, its y released as if it were x)."""
    ckpt, _ = hostile
    x_file, y_file = tmp_path / RELEASE_NAME.format("x"), tmp_path / RELEASE_NAME.format("y")
    assert run("convert", ckpt, x_file).exit_code == 0
    y = torch.load(ckpt, weights_only=True)["model"]
    save_file({k: v.contiguous() for k, v in y.items()}, str(y_file))
    return ckpt, x_file, y_file


@pytest.mark.parametrize("mode", MODES)
def test_check_pass_with_hostile_names(releases, invoke, mode):
    ckpt, x_file, _ = releases
    result, summary = invoke(mode, "check", x_file, "--ckpt", ckpt)
    assert result.exit_code == 0
    if mode == "github":
        heading, *rest = summary.splitlines()
        assert heading == f"### ✅ sfckpt check: {textout.markdown_code(str(x_file))}"
        assert not any(line.startswith("#") for line in rest)


@pytest.mark.parametrize("mode", MODES)
def test_check_fail_with_hostile_names(releases, invoke, mode):
    ckpt, _, y_file = releases
    result, summary = invoke(mode, "check", y_file, "--ckpt", ckpt)
    assert result.exit_code == 1
    if mode == "json":
        assert sorted(f["name"] for f in json.loads(result.stdout)["findings"]) == sorted(HOSTILE[UNTRAINED:])
    else:
        assert all(textout.log_text(textout.terminal(n)) in result.stdout for n in HOSTILE[UNTRAINED:])
    if mode == "github":
        assert summary.startswith("### ❌ sfckpt check")


@pytest.mark.parametrize("mode", MODES)
def test_check_error_names_the_tensor_on_one_line(releases, invoke, mode):
    ckpt, x_file, _ = releases
    result, _ = invoke(mode, "check", x_file, x_file, "--ckpt", ckpt)  # every name twice: exit 2
    assert_one_error_line(result, github=mode == "github")
    named = [n for n in HOSTILE if textout.terminal(n) in result.stderr]
    assert named
    if mode == "github":
        assert annotation_form(named[0]) in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("mode", MODES)
def test_missing_input_with_a_hostile_file_name(invoke, tmp_path, mode):
    result, _ = invoke(mode, "inspect", tmp_path / CKPT_NAME)
    assert_one_error_line(result, github=mode == "github")
    assert textout.terminal(CKPT_NAME) in result.stderr


def test_plot_of_hostile_names_is_drawn(run, tmp_path, monkeypatch):
    """A picture is an output too: `$` in a name is text, not mathtext that fails to parse."""
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    names = ["x$\\frac{$.weight", "b$^$.w", *HOSTILE]
    save_file({n: torch.ones(3) for n in names}, str(a))
    save_file({n: torch.full((3,), 2.0) for n in names}, str(b))
    result = run("diff", a, b, "--plot", tmp_path / "gap.png")
    assert result.exit_code == 0 and (tmp_path / "gap.png").stat().st_size > 0
    assert_printed_safely(result, "terminal")


def test_debug_traceback_is_printed_in_the_log_form(invoke, tmp_path, monkeypatch):
    monkeypatch.setenv("SFCKPT_DEBUG", "1")
    ckpt, _ = _train(tmp_path, HOSTILE, poison=HOSTILE[0])
    result, _ = invoke("github", "convert", ckpt, tmp_path / "x.safetensors")  # invoke checks the output
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_library_warnings_print_as_one_escaped_line(capsys):
    """A library's warning may quote the input (a key, a target module): while a command runs it goes
    through the edge too."""
    from sfckpt.cli import handle_errors

    @handle_errors
    def command():
        warnings.warn("key 'a\x1b[2J\n::error::x' is not used", UserWarning)

    command()
    assert capsys.readouterr().err == "warning: UserWarning: key 'a\\x1b[2J\\n::error::x' is not used\n"


# ---- GitHub Actions ------------------------------------------------------------------------------


def test_step_summary_renders_names_as_code_only(releases, invoke):
    markdown_it = pytest.importorskip("markdown_it")
    ckpt, _, y_file = releases
    _, summary = invoke("github", "check", y_file, "--ckpt", ckpt)
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(summary)
    assert html.count("<h3>") == 1 and html.startswith("<h3>❌ sfckpt check")
    assert "<img" not in html and "<a " not in html
    assert html.count("<tr>") == 1 + len(HOSTILE) - UNTRAINED  # the header and one row per finding
    for name in HOSTILE[UNTRAINED:]:
        shown = textout.terminal(name).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert f"<td><code>{shown}</code></td>" in html


def _outside_code_spans(line):
    """The line without its code spans, by CommonMark's rule: a run of backticks not escaped by a backslash
    opens a span that the next run of exactly as many closes; an unclosed run stays in the text."""
    rest, i = [], 0
    while (opener := re.compile(r"(?<![\\`])`+(?!`)").search(line, i)) is not None:
        closer = re.compile(rf"(?<!`){opener.group()}(?!`)").search(line, opener.end())
        if closer is None:
            break
        rest.append(line[i:opener.start()])
        i = closer.end()
    return "".join(rest) + line[i:]


def test_step_summary_is_one_line_per_row_with_balanced_code_spans(releases, invoke):
    ckpt, _, y_file = releases
    _, summary = invoke("github", "check", y_file, "--ckpt", ckpt)
    lines = summary.splitlines()
    assert [line for line in lines if line.startswith("#")] == [lines[0]]
    assert len([line for line in lines if line.startswith("| ")]) == 1 + len(HOSTILE) - UNTRAINED
    for line in lines:
        outside = _outside_code_spans(line)
        assert "<" not in outside and not re.search(r"(?<!\\)`", outside), line  # no HTML, no open span
        assert outside.count("|") in (0, 6), line  # table rows keep their five cells


def test_annotation_escapes_what_github_would_decode():
    line = textout.workflow_command("error", "100% done\n::warning::x", title="a,b: c\r")
    assert line == "::error title=a%2Cb%3A c\\r::100%25 done\\n::warning::x"


def test_exit_2_annotation_goes_to_stderr_and_stdout_stays_json(invoke, tmp_path):
    result, _ = invoke("github", "inspect", tmp_path / "missing.pt", "--json")
    assert json.loads(result.stdout)["error"]["exit_code"] == 2
    assert result.stderr.splitlines()[-1].startswith("::error title=sfckpt::")


# ---- JSON ----------------------------------------------------------------------------------------


def _float64_checkpoint(tmp_path):
    """A float64 model trained with AdamWScheduleFree, with ±1e308 in a parameter no gradient reaches (so x = y
    there): negating that tensor in a release makes gaps that overflow to inf."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 4, dtype=torch.float64)
            self.big = nn.Parameter(torch.tensor([1e308, -1e308, 1.0], dtype=torch.float64))

        def forward(self, inp):
            return self.fc1(inp)

    model = Model()
    opt = trainers.train(model, "adamw", steps=3)
    path = tmp_path / "f64.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return path


@pytest.mark.parametrize("command", ["diff", "check"])
def test_json_gaps_at_the_float64_limit_are_strings(run, tmp_path, command, monkeypatch):
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    ckpt = _float64_checkpoint(tmp_path)
    x_file, flipped = tmp_path / "x.safetensors", tmp_path / "flipped.safetensors"
    assert run("convert", ckpt, x_file).exit_code == 0
    x = load_file(str(x_file))
    save_file({**x, "big": -x["big"]}, str(flipped))
    args = ("diff", flipped, x_file) if command == "diff" else ("check", flipped, "--ckpt", ckpt)
    result = run(*args, "--json")
    report = json.loads(result.stdout, parse_constant=_no_constant)
    if command == "diff":
        big = next(t for t in report["tensors"] if t["name"] == "big")
        assert big["max_abs"] == "Infinity" and big["rel_l2"] in ("NaN", "Infinity")
    else:
        assert result.exit_code == 1 and report["findings"][0]["max_abs"] == "Infinity"


def test_lone_surrogate_names_print_in_every_mode(invoke, tmp_path):
    """Such a name is refused where it is read (no safetensors file could hold it); the refusal still
    prints it escaped, as valid UTF-8, in every mode."""
    names = ["bad\ud800name", "w\udfff"] + [f"t{i}" for i in range(12)]
    ckpt, _ = _train(tmp_path, names, poison=names[0], name="surrogate.pt")
    for mode in MODES:
        result, _ = invoke(mode, "inspect", ckpt, "--scan")
        assert result.exit_code == 2
        result.stdout.encode("utf-8")
        result.stderr.encode("utf-8")
        assert "bad\\ud800name" in result.stderr.splitlines()[0]
        if mode == "json":
            assert "bad\\ud800name" in json.loads(result.stdout)["error"]["message"]


# ---- the forms themselves ------------------------------------------------------------------------


@pytest.mark.parametrize("raw, shown", [
    ("a\x1b[2Jb", "a\\x1b[2Jb"), ("a\u009bb", "a\\x9bb"), ("a\r\n\tb", "a\\r\\n\\tb"), ("\x7f", "\\x7f"),
    ("x\u202ey\u2066", "x\\u202ey\\u2066"), ("\ud800", "\\ud800"), ("a\\x1b", "a\\\\x1b"), ("fc1.weight", "fc1.weight"),
    ("β → ✅", "β → ✅"),
])
def test_terminal_form(raw, shown):
    assert textout.terminal(raw) == shown


def test_log_form_defuses_workflow_commands_without_touching_sfckpt_words():
    shown = textout.log_text("  ::error::x\n\u00a0::warning::y\nok ::a::b")
    assert shown == "  \\x3a:error::x\n\u00a0\\x3a:warning::y\nok ::a::b"
    assert textout.log_text("a ##[error]b ##vso[task.setvariable]c") == "a ##\\x5berror]b ##vso\\x5btask.setvariable]c"


@pytest.mark.parametrize("name, span", [
    ("conv.weight", "`conv.weight`"), ("a`b", "``a`b``"), ("``x", "``` ``x ```"), ("p|q", "`p\\|q`"),
])
def test_markdown_code_spans(name, span):
    assert textout.markdown_code(name, in_table=True) == span


def test_strict_json_has_no_nan_or_infinity_and_keeps_escapable_text():
    doc = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "n\ud800": "##[error]x"}
    text = textout.json_text(doc)
    assert json.loads(text, parse_constant=_no_constant) == {"a": "NaN", "b": ["Infinity", "-Infinity", 1.5],
                                                              "n\\ud800": "##[error]x"}
    assert "##[" not in text and text.isascii()


def test_only_textout_prints():
    """The one edge: no other module of sfckpt prints (the start-up interrupt message holds no input)."""
    package = Path(textout.__file__).parent
    printing = re.compile(r"\bclick\.(echo|secho)\(|\bprint\(|\bsys\.(stdout|stderr)\.write\(")
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if p.name not in ("textout.py", "__main__.py") and printing.search(p.read_text())]
    assert offenders == []
