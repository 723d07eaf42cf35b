"""Security (issue 6): remote code only when the config says so, nothing unpickled from disk, TLS
verified by default, secrets read from the environment and never written to the run folder.

The static scans read the package source with `ast` (no imports), so they also cover code paths
the fast tests never run (vLLM, Ray). Serving (larpo_ray/serve.py) has its own tests."""

import ast
import json
import os
import pickle
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from builders import TINY_IN_PROCESS

from actors.reward import HTTPScorer, RewardModelScorer, ScorerError
from larpo_ray import models
from larpo_ray.config import ConfigError, RewardConfig
from larpo_ray.models import ModelError
from larpo_ray.types import Prompt

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FILES = sorted(p for d in ("larpo_ray", "actors") for p in (ROOT / d).rglob("*.py"))


def calls(path: Path):
    """(dotted name of the callee, ast.Call) of every call in a source file: `torch.load`,
    `AutoTokenizer.from_pretrained`, `self.engine.load_checkpoint`, `LLM`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def where(path: Path, call: ast.Call) -> str:
    return f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)[:120]}"


# ---- trust_remote_code ---------------------------------------------------------------------------


def test_no_call_hardcodes_trust_remote_code_and_every_loader_passes_the_config_value():
    """`trust_remote_code=True` never appears as a literal; every AutoX.from_pretrained and vLLM
    `LLM(...)` passes a variable (the config's model.trust_remote_code), except the loader of the
    embedded GGUF (a fixed file with no code, loaded with the default False)."""
    hardcoded, missing, seen = [], [], 0
    for path in PACKAGE_FILES:
        for name, call in calls(path):
            value = keyword(call, "trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is not False:
                hardcoded.append(where(path, call))
            loader = (name.split(".")[0].startswith("Auto") and name.endswith(".from_pretrained")) or name == "LLM"
            if loader:
                seen += 1
                if value is None and keyword(call, "gguf_file") is None:
                    missing.append(where(path, call))
    assert not hardcoded, f"trust_remote_code hard-coded: {hardcoded}"
    assert not missing, f"loaders that ignore model.trust_remote_code: {missing}"
    assert seen >= 6  # the scan found the loaders (models.py, reward.py, generator.py)


def _custom_code_folder(folder: Path, model_type: str = "my-lm") -> Path:
    """A model folder whose config.json maps AutoModelForCausalLM / AutoConfig to its own .py
    files; importing either file creates `RAN`, so the test sees whether any of it executed."""
    folder.mkdir()
    marker = folder / "RAN"
    for module in ("modeling_my", "configuration_my"):
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": model_type,
                "architectures": ["MyLMForCausalLM"],
                "auto_map": {
                    "AutoConfig": "configuration_my.MyConfig",
                    "AutoModelForCausalLM": "modeling_my.MyLMForCausalLM",
                },
            }
        )
    )
    (folder / "model.safetensors").touch()
    return folder


def test_model_with_custom_code_is_refused_unless_trusted(tmp_path):
    folder = _custom_code_folder(tmp_path / "custom")
    with pytest.raises(ModelError) as err:
        models.resolve_model(str(folder))
    msg = str(err.value)
    assert "own Python code" in msg and "modeling_my.MyLMForCausalLM" in msg and "model.trust_remote_code = true" in msg
    # transformers refuses it too when the flag is off, whatever the caller: no code runs.
    with pytest.raises(ValueError, match="trust_remote_code"):
        models.load_causal_lm(folder)
    assert not (folder / "RAN").exists()
    assert models.resolve_model(str(folder), trust_remote_code=True) == str(folder)  # opting in works


def test_cli_refuses_custom_code_with_exit_2(tmp_path, capsys):
    from larpo_ray.run import main

    folder = _custom_code_folder(tmp_path / "custom")
    argv = [
        "--model.name_or_path",
        str(folder),
        "--resources.use_ray",
        "false",
        "--loop.run_dir",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 2
    assert "model.trust_remote_code = true" in capsys.readouterr().err
    assert not (folder / "RAN").exists()


def test_auto_map_on_a_builtin_model_type_loads_the_builtin_class(tmp_path):
    """A known model_type with an auto_map: transformers uses its own class and runs no code, so
    the folder is accepted without trust_remote_code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, vocab_size=64)
    ).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_my.MyLMForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_my.py").write_text(f"open({str(folder / 'RAN')!r}, 'w').close()\n")
    assert models.resolve_model(str(folder)) == str(folder)
    assert type(models.load_causal_lm(folder)).__name__ == "LlamaForCausalLM"
    assert not (folder / "RAN").exists()


# ---- nothing unpickled from disk -----------------------------------------------------------------

# Calls that unpickle (or write pickles that something would later have to unpickle). DeepSpeed's
# engine.save/load_checkpoint write and read optimizer state with torch.save / torch.load
# (weights_only=False); our own checkpoints (larpo_ray/checkpoint.py) are safetensors + JSON.
UNPICKLING = {
    "torch.load",
    "torch.save",
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "cloudpickle.load",
    "cloudpickle.loads",
    "dill.load",
    "dill.loads",
    "joblib.load",
    "pd.read_pickle",
    "pandas.read_pickle",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
}
UNPICKLING_METHODS = ("engine.load_checkpoint", "engine.save_checkpoint", "load_state_dict_from_url")
PICKLE_MODULES = {"pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def test_no_code_path_unpickles_a_file():
    """Checkpoints, weights and caches are safetensors and JSON/YAML (safe_load). Allowed, and not
    from disk: Ray's object store and vLLM's collective_rpc pickle objects in memory between this
    run's own processes (actors/generator.py sets VLLM_ALLOW_INSECURE_SERIALIZATION for the
    latter: the weights themselves travel as a safetensors file, read with safetensors.load_file)."""
    found = []
    for path in PACKAGE_FILES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                found += [
                    f"{path.relative_to(ROOT)}:{node.lineno}: import {n}"
                    for n in names
                    if n.split(".")[0] in PICKLE_MODULES
                ]
        for name, call in calls(path):
            if name in UNPICKLING or name.endswith(tuple(f".{m}" for m in UNPICKLING_METHODS)):
                found.append(where(path, call))
            if (
                name in ("np.load", "numpy.load")
                and isinstance(keyword(call, "allow_pickle"), ast.Constant)
                and keyword(call, "allow_pickle").value
            ):
                found.append(where(path, call))
            if (
                name.endswith("save_pretrained")
                and isinstance(keyword(call, "safe_serialization"), ast.Constant)
                and not keyword(call, "safe_serialization").value
            ):
                found.append(where(path, call))
    assert not found, f"code that reads or writes pickles: {found}"


def test_weights_load_only_from_safetensors():
    """Every from_pretrained of model weights passes use_safetensors=True, so transformers never
    falls back to a pickled pytorch_model.bin; vLLM only reads folders that resolve_model passed
    (which requires *.safetensors)."""
    model_loads, missing = 0, []
    for path in PACKAGE_FILES:
        for name, call in calls(path):
            if (
                name.startswith("AutoModel")
                and name.endswith(".from_pretrained")
                and keyword(call, "gguf_file") is None
            ):
                model_loads += 1
                value = keyword(call, "use_safetensors")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    missing.append(where(path, call))
    assert not missing, f"weights loaded without use_safetensors=True: {missing}"
    assert model_loads >= 2  # load_causal_lm and the reward model


def test_insecure_vllm_serialization_stays_in_the_generator():
    """The one in-memory pickling switch is named only where the generator's weight reload needs it."""
    users = [str(p.relative_to(ROOT)) for p in PACKAGE_FILES if "VLLM_ALLOW_INSECURE_SERIALIZATION" in p.read_text()]
    assert users in ([], ["actors/generator.py"])


class _Payload:
    """Unpickling this creates a folder: a stand-in for a checkpoint that runs code when loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _pickled_weights_folder(folder: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        vocab_size=64,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"payload": _Payload(str(folder / "RAN"))}))
    return folder


def test_pickled_weights_are_refused_and_never_opened(tmp_path):
    folder = _pickled_weights_folder(tmp_path / "bin-only")
    with pytest.raises(ModelError) as err:
        models.resolve_model(str(folder))
    msg = str(err.value)
    assert "no .safetensors weights" in msg and "pytorch_model.bin" in msg and "save_pretrained" in msg
    with pytest.raises(OSError, match="safetensors"):  # the loader itself refuses too
        models.load_causal_lm(folder)
    with pytest.raises(ModelError, match="reward.model_path"):
        RewardModelScorer(str(folder))
    assert not (folder / "RAN").exists()


# ---- TLS of the HTTP scorer ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (cert.pem, key.pem)."""
    pytest.importorskip("cryptography")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    out = tmp_path_factory.mktemp("tls")
    (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(out / "cert.pem"), str(out / "key.pem")


@pytest.fixture
def https_scorer(self_signed):
    """An HTTPS reward server on 127.0.0.1 with the self-signed certificate; scores = lengths."""
    requests_seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests_seen.append(body)
            payload = json.dumps({"scores": [len(r) for r in body["responses"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.handle_error = lambda *args: None  # refused handshakes are the point of the test
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}/score", requests_seen
    httpd.shutdown()
    httpd.server_close()


PROMPT = Prompt(uid="p", text="q", token_ids=(1,), messages=(("user", "q"),))


def test_http_scorer_verifies_tls_by_default(https_scorer, self_signed):
    url, seen = https_scorer
    assert RewardConfig().verify_tls is True and HTTPScorer(url).verify is True
    with pytest.raises(ScorerError) as err:
        HTTPScorer(url, max_retries=0).score([PROMPT], ["abc"])
    msg = str(err.value)
    assert "TLS verification failed" in msg and "reward.ca_bundle" in msg and url in msg
    assert seen == []  # nothing was sent to the unverified server
    # The certificate's own CA (here: itself) verifies it.
    assert HTTPScorer(url, ca_bundle=self_signed[0]).score([PROMPT], ["abc"]) == [3.0]


def test_http_scorer_without_verification_warns(https_scorer, caplog):
    url, _ = https_scorer
    with caplog.at_level("WARNING", logger="actors.http_scorer"):
        scorer = HTTPScorer(url, verify_tls=False)
    assert "reward.verify_tls = false" in caplog.text and "reward.ca_bundle" in caplog.text
    with pytest.warns(Warning):  # urllib3's InsecureRequestWarning, on every unverified request
        assert scorer.score([PROMPT], ["ab"]) == [2.0]


def test_tls_knobs_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="reward.ca_bundle .* only with reward.verify_tls = true"):
        RewardConfig(kind="http", url="https://rm/score", verify_tls=False, ca_bundle="ca.pem")
    with pytest.raises(ScorerError, match="is not a file on this node"):
        HTTPScorer("https://rm/score", ca_bundle=str(tmp_path / "missing.pem"))


# ---- secrets -------------------------------------------------------------------------------------

WANDB_SECRET = "planted-secret-wandb-0123456789abcdef0123456789"
SCORER_SECRET = "planted-secret-scorer-9876543210"
HF_SECRET = "hf_plantedsecret0123456789"


def test_api_key_config_holds_a_name_and_a_pasted_key_is_not_echoed():
    assert RewardConfig().api_key_env == "LARPO_REWARD_API_KEY"
    with pytest.raises(ConfigError) as err:
        RewardConfig(api_key_env=SCORER_SECRET)
    assert "NAME of an environment variable" in str(err.value) and SCORER_SECRET not in str(err.value)


@pytest.fixture
def scorer_server():
    """A plain-HTTP loopback reward server that records Authorization headers; score = length % 5."""
    auth = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            auth.append(self.headers.get("Authorization"))
            payload = json.dumps({"scores": [len(r) % 5 for r in body["responses"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/score", auth
    httpd.shutdown()
    httpd.server_close()


def test_secrets_never_reach_the_run_folder_or_the_console(tmp_path, monkeypatch, capfd, scorer_server):
    """A short in-process run (1 iteration, HTTP scorer, W&B offline) with a W&B key, an HF token
    and the scorer's key planted in the environment: the scorer gets its key as a header, and no
    file of the run folder (config.yaml, metrics, policy, every wandb/ file) nor the console holds
    any of them."""
    from larpo_ray.run import main

    url, auth = scorer_server
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    monkeypatch.setenv("MY_SCORER_KEY", SCORER_SECRET)
    run_dir = tmp_path / "run"
    argv = [
        *TINY_IN_PROCESS,
        "--loop.iterations",
        "1",
        "--loop.prompts_per_iteration",
        "4",
        "--data.num_eval",
        "4",
        "--reward.kind",
        "http",
        "--reward.url",
        url,
        "--reward.api_key_env",
        "MY_SCORER_KEY",
        "--logging.wandb_mode",
        "offline",
        "--logging.progress",
        "false",
        "--loop.run_dir",
        str(run_dir),
    ]
    assert main(argv) == 0
    assert auth and set(auth) == {f"Bearer {SCORER_SECRET}"}  # the key was used...
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and (run_dir / "config.yaml").is_file()
    assert "MY_SCORER_KEY" in (run_dir / "config.yaml").read_text()  # ...the config names it
    leaks = [
        f"{p.relative_to(run_dir)} holds {s[:20]}..."
        for p in files
        for s in (WANDB_SECRET, SCORER_SECRET, HF_SECRET)
        if s.encode() in p.read_bytes()
    ]
    assert not leaks, leaks
    console = capfd.readouterr()
    assert not [s for s in (WANDB_SECRET, SCORER_SECRET, HF_SECRET) if s in console.out + console.err]
