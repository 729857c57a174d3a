"""Static checks of the Terraform module in terraform/ (no provider can be downloaded here).

- the fan-out: client functions `for_each` over var.clients, aggregators over var.architectures;
- entry points, environment variables and outputs against docs/serverless.md and the code;
- identities: no public member anywhere, every IAM member is one of the module's own;
- `terraform fmt -check`, checkov with no failed check (skips only inline, with a reason);
- the module's variables and locals evaluated by Terraform itself on example.tfvars (a
  provider-less copy: variables.tf + locals.tf), including validations that must reject.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import hcl2
import pytest

ROOT = Path(__file__).resolve().parents[1]
TF_DIR = ROOT / "terraform"
CONTRACT = ROOT / "docs" / "serverless.md"
CLOUD_MAIN = ROOT / "cloud" / "main.py"
EXAMPLE_TFVARS = TF_DIR / "example.tfvars"
PUBLIC_MEMBERS = ("allusers", "allauthenticatedusers")
# Google's own writer of Cloud Storage usage logs (needed on the logs bucket under UBLA).
STORAGE_LOG_WRITER = "group:cloud-storage-analytics@google.com"

# Terraform without network: no version check, no user CLI config.
TF_ENV = {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1", "TF_INPUT": "0"}


# ------------------------------------------------------------------------------ parsing


def _unquote(value):
    """python-hcl2 (>= 7) keeps the quotes of block labels and string literals; drop them, and
    its bookkeeping keys, so that the structure reads like the HCL."""
    if isinstance(value, dict):
        return {
            _unquote(k): _unquote(v)
            for k, v in value.items()
            if k not in ("__is_block__", "__comments__")
        }
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"')
    return value


def _load(path: Path) -> dict:
    with path.open() as fh:
        return _unquote(hcl2.load(fh))


@pytest.fixture(scope="module")
def tf() -> dict:
    """All blocks of terraform/*.tf: resources[type][name], data, variables, outputs, locals."""
    files = sorted(TF_DIR.glob("*.tf"))
    assert files, f"no .tf files in {TF_DIR}"
    out: dict = {"resource": {}, "data": {}, "variable": {}, "output": {}, "locals": {}}
    for path in files:
        doc = _load(path)
        for kind in ("resource", "data"):
            for block in doc.get(kind, []):
                for rtype, named in block.items():
                    for name, body in named.items():
                        assert name not in out[kind].setdefault(rtype, {}), (
                            f"duplicate {rtype}.{name}"
                        )
                        out[kind][rtype][name] = body
        for kind in ("variable", "output"):
            for block in doc.get(kind, []):
                out[kind].update(block)
        for block in doc.get("locals", []):
            out["locals"].update(block)
    return out


def _block(body: dict, name: str) -> dict:
    """The single nested block `name` of a resource body."""
    blocks = body[name]
    assert isinstance(blocks, list) and len(blocks) == 1, f"expected one '{name}' block"
    return blocks[0]


def _functions(tf: dict) -> dict[str, dict]:
    return tf["resource"].get("google_cloudfunctions2_function", {})


def _function_by_entry_point(tf: dict) -> dict[str, dict]:
    return {_block(body, "build_config")["entry_point"]: body for body in _functions(tf).values()}


def _map_keys(expr) -> set[str]:
    """Keys of a map written in HCL: a dict (a literal), or an expression string such as
    `${merge(local.x, {A = ..., B = ...})}` whose literal keys and `local.*` maps count."""
    if isinstance(expr, dict):
        return set(expr)
    assert isinstance(expr, str), expr
    keys = set(re.findall(r"[{,]\s*([A-Z][A-Z0-9_]*)\s*=", expr))
    return keys


def _env_names(tf: dict, function: dict) -> set[str]:
    """Names of the environment variables a function resource sets."""
    expr = _block(function, "service_config")["environment_variables"]
    names = _map_keys(expr)
    if isinstance(expr, str):
        for local in re.findall(r"local\.([a-z_][a-z0-9_]*)", expr):
            names |= _map_keys(tf["locals"][local])
    return names


def _contract_functions() -> dict[str, set[str]]:
    """Entry point -> environment variables it reads, from the table in docs/serverless.md."""
    table: dict[str, set[str]] = {}
    for line in CONTRACT.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`[a-z_]+`", cells[1]):
            table[cells[1].strip("`")] = set(re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[3]))
    assert {"client", "aggregator"} <= set(table), f"function table not found in {CONTRACT}"
    return table


def _contract_outputs() -> set[str]:
    text = CONTRACT.read_text()
    section = text.split("## Terraform outputs", 1)[1]
    names = set(re.findall(r"`([a-z_]+)`", section.split("\n## ", 1)[0]))
    assert {"client_function_urls", "aggregator_function_urls", "arrays_bucket"} <= names
    return names


def _code_files() -> list[Path]:
    """The code that runs inside the functions: cloud/main.py and flwr_kd/serverless/."""
    return [CLOUD_MAIN, *sorted((ROOT / "flwr_kd" / "serverless").rglob("*.py"))]


def _env_vars_in_code(paths) -> set[str]:
    """FLWR_KD_* names in the code: every string constant that is exactly such a name
    (os.environ[...], os.environ.get(...), os.getenv(...) or a list of required names alike)."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"FLWR_KD_[A-Z0-9_]+", node.value)
            ):
                names.add(node.value)
    return names


# ------------------------------------------------------------------------------ fan-out


def test_fan_out_uses_for_each_over_clients_and_architectures(tf):
    functions = _functions(tf)
    with_for_each = {
        name: body["for_each"] for name, body in functions.items() if "for_each" in body
    }
    assert len(with_for_each) >= 2, (
        f"expected >= 2 google_cloudfunctions2_function with for_each, got {with_for_each}"
    )
    by_entry = _function_by_entry_point(tf)
    assert set(by_entry) == {"client", "aggregator"}
    assert by_entry["client"]["for_each"] == "${var.clients}"
    assert by_entry["aggregator"]["for_each"] == "${toset(var.architectures)}"
    for body in functions.values():
        build = _block(body, "build_config")
        assert build["runtime"] == "python311"
        storage = _block(_block(build, "source"), "storage_source")
        assert storage["object"] == "${google_storage_bucket_object.source.name}"
        service = _block(body, "service_config")
        assert service["ingress_settings"] == "${var.ingress_settings}"
        assert service["service_account_email"].startswith("${google_service_account.")


def test_variables_are_validated(tf):
    variables = tf["variable"]
    for name in (
        "project",
        "region",
        "name_prefix",
        "clients",
        "architectures",
        "client_memory",
        "aggregator_memory",
        "timeout_seconds",
        "max_instances",
        "retention_days",
    ):
        assert name in variables, f"variable {name} missing"
        assert variables[name].get("validation"), f"variable {name} has no validation"


def test_entry_points_are_functions_of_cloud_main(tf):
    tree = ast.parse(CLOUD_MAIN.read_text(), filename=str(CLOUD_MAIN))
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    entry_points = {_block(body, "build_config")["entry_point"] for body in _functions(tf).values()}
    assert entry_points == set(_contract_functions()), "entry points differ from docs/serverless.md"
    missing = entry_points - defined
    assert not missing, f"cloud/main.py defines no top-level function {sorted(missing)}"


# ------------------------------------------------------------------------------ environment


def test_functions_set_every_contract_variable(tf):
    by_entry = _function_by_entry_point(tf)
    for entry_point, names in _contract_functions().items():
        missing = names - _env_names(tf, by_entry[entry_point])
        assert not missing, f"{entry_point} function lacks {sorted(missing)} (docs/serverless.md)"


def test_functions_set_every_variable_the_code_reads(tf):
    read = _env_vars_in_code(_code_files())
    assert "FLWR_KD_BUCKET" in read, (
        "found no FLWR_KD_* read in the function code: is the scan broken?"
    )
    set_somewhere = set().union(*(_env_names(tf, f) for f in _functions(tf).values()))
    missing = read - set_somewhere
    assert not missing, f"the code reads {sorted(missing)}, which no function sets"


def test_code_reads_every_variable_terraform_sets(tf):
    """Each FLWR_KD_* variable set on a function is read somewhere in cloud/ or flwr_kd/: a
    variable nothing reads means the code and the contract drifted apart (e.g. token checks)."""
    read = _env_vars_in_code(
        [*sorted((ROOT / "cloud").rglob("*.py")), *sorted((ROOT / "flwr_kd").rglob("*.py"))]
    )
    set_somewhere = set().union(*(_env_names(tf, f) for f in _functions(tf).values()))
    unread = {n for n in set_somewhere if n.startswith("FLWR_KD_")} - read
    assert not unread, (
        f"Terraform sets {sorted(unread)} but no code under cloud/ or flwr_kd/ reads it"
    )


# ------------------------------------------------------------------------------ outputs, data


def test_outputs_cover_the_contract(tf):
    missing = _contract_outputs() - set(tf["output"])
    assert not missing, f"outputs.tf lacks {sorted(missing)} (docs/serverless.md)"


def test_buckets_are_private_versioned_and_logged(tf):
    buckets = tf["resource"]["google_storage_bucket"]
    assert {"arrays", "sources", "logs"} <= set(buckets)
    for name, body in buckets.items():
        assert body["uniform_bucket_level_access"] is True, name
        assert body["public_access_prevention"] == "enforced", name
        assert _block(body, "versioning")["enabled"] is True, name
    for name in ("arrays", "sources"):
        assert (
            _block(buckets[name], "logging")["log_bucket"] == "${google_storage_bucket.logs.name}"
        )
    runs_rules = [
        _block(rule, "condition")
        for rule in buckets["arrays"]["lifecycle_rule"]
        if _block(rule, "action")["type"] == "Delete"
    ]
    assert any(
        c.get("age") == "${var.retention_days}" and c.get("matches_prefix") == ["runs/"]
        for c in runs_rules
    )


def test_firestore_native_database_and_rounds_index(tf):
    database = tf["resource"]["google_firestore_database"]["runs"]
    assert database["type"] == "FIRESTORE_NATIVE"
    assert database["name"] == "${var.firestore_database}"
    indexes = tf["resource"]["google_firestore_index"].values()
    fields = [
        (ix["collection"], [(f["field_path"], f["order"]) for f in ix["fields"]]) for ix in indexes
    ]
    assert ("rounds", [("status", "ASCENDING"), ("round", "ASCENDING")]) in fields


# ------------------------------------------------------------------------------ identities


def _iam_members(tf: dict):
    for rtype, named in tf["resource"].items():
        if "iam" not in rtype:
            continue
        for name, body in named.items():
            members = body.get("members", [body.get("member")])
            for member in members if isinstance(members, list) else [members]:
                yield f"{rtype}.{name}", body, member


def test_no_public_member_anywhere():
    for path in sorted(TF_DIR.rglob("*")):
        if path.is_file() and ".terraform" not in path.parts and ".build" not in path.parts:
            text = path.read_text(errors="replace").lower()
            for public in PUBLIC_MEMBERS:
                assert public not in text, f"{path.relative_to(ROOT)} mentions {public}"


def test_every_iam_member_is_one_of_the_modules_identities(tf):
    members = list(_iam_members(tf))
    assert len(members) >= 8
    for where, body, member in members:
        assert isinstance(member, str), where
        if re.fullmatch(r"\$\{google_service_account\.[a-z_]+(\[each\.key\])?\.member\}", member):
            continue
        if member == STORAGE_LOG_WRITER:
            continue
        if member == "${each.value}":
            for_each = body["for_each"]
            # principals that may act as the driver, restricted by the variable's validation ...
            if for_each == "${toset(var.driver_impersonators)}":
                continue
            # ... or a map whose values are the module's service accounts
            sa_ref = r"google_service_account\.[a-z_]+(\[[a-z.]+\])?\.member"
            assert re.search(sa_ref, for_each), f"{where}: for_each {for_each}"
            rest = re.sub(sa_ref, "", for_each)
            assert not re.search(
                r"(user|group|domain|serviceAccount|principal\w*):|var\.(?!clients\b)", rest
            ), f"{where}: for_each {for_each}"
            continue
        raise AssertionError(f"{where}: unexpected IAM member {member!r}")


def test_only_the_driver_invokes_functions(tf):
    invokers = [
        (rtype, body)
        for rtype, named in tf["resource"].items()
        for body in named.values()
        if body.get("role") in ("roles/run.invoker", "roles/cloudfunctions.invoker")
    ]
    assert len(invokers) >= 2
    for rtype, body in invokers:
        assert body["member"] == "${google_service_account.driver.member}", rtype
    covered = {
        re.search(r"google_cloudfunctions2_function\.([a-z_]+)", body["name"]).group(1)
        for _, body in invokers
    }
    assert covered == set(_functions(tf)), f"invoker bindings cover {covered}"


def test_client_storage_access_is_conditioned_on_its_own_prefixes(tf):
    bindings = tf["resource"]["google_storage_bucket_iam_member"]
    for name, body in bindings.items():
        if body["bucket"] != "${google_storage_bucket.arrays.name}" or "driver" in name:
            continue
        assert "condition" in body, f"{name}: unconditional access to the arrays bucket"
        assert body["role"] in (
            "roles/storage.objectViewer",
            "roles/storage.objectCreator",
            "roles/storage.objectUser",
        ), name


# ------------------------------------------------------------------------------ tools


def _terraform() -> str:
    binary = shutil.which("terraform") or "/usr/local/bin/terraform"
    assert Path(binary).exists(), (
        "terraform is needed for these checks (it is at /usr/local/bin here and in CI)"
    )
    return binary


def test_terraform_fmt_is_clean():
    proc = subprocess.run(
        [_terraform(), "fmt", "-check", "-recursive", "-diff", str(TF_DIR)],
        capture_output=True,
        check=False,
        text=True,
        env=TF_ENV,
        timeout=120,
    )
    assert proc.returncode == 0, f"terraform fmt -check failed:\n{proc.stdout}\n{proc.stderr}"


def _checkov() -> str:
    candidates = [
        os.environ.get("CHECKOV"),
        str(ROOT / ".venv-checkov" / "bin" / "checkov"),
        shutil.which("checkov"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    raise AssertionError(
        "checkov not found: `make test` installs it into .venv-checkov (or set CHECKOV)"
    )


def test_checkov_reports_no_failed_check():
    proc = subprocess.run(
        [
            _checkov(),
            "-d",
            str(TF_DIR),
            "--framework",
            "terraform",
            "--output",
            "json",
            "--skip-download",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=600,
        cwd=ROOT,
        # checkov runs in its own venv: earlier tests (Ray) leave PYTHONPATH pointing into .venv,
        # whose python-hcl2 would shadow checkov's bc-python-hcl2
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")},
    )
    assert proc.stdout.strip(), (
        f"checkov printed nothing (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    )
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    summary = {
        k: sum(r["summary"][k] for r in reports)
        for k in ("passed", "failed", "skipped", "parsing_errors")
    }
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']})"
        for r in reports
        for c in r["results"]["failed_checks"]
    ]
    assert summary["failed"] == 0 and not failed, f"checkov failed checks: {failed}"
    assert summary["parsing_errors"] == 0, summary
    assert summary["passed"] >= 20, summary
    for r in reports:
        for skipped in r["results"]["skipped_checks"]:
            reason = (skipped.get("check_result") or {}).get("suppress_comment", "")
            assert len(reason.strip()) >= 20, (
                f"skip of {skipped['check_id']} on {skipped['resource']} has no reason"
            )
    # Skips are inline only: no config file or external baseline may hide a check.
    assert not [
        p
        for p in TF_DIR.rglob("*")
        if p.name in (".checkov.yaml", ".checkov.yml", ".checkov.baseline")
    ]


# ------------------------------------------------------------------------------ evaluation


def _eval_module(tmp_path: Path, *extra_args: str) -> subprocess.CompletedProcess:
    """Apply variables.tf + locals.tf (no provider, no resource) with example.tfvars, and
    output the locals. The copy sits in <tmp>/terraform with cloud/ and flwr_kd/ linked beside
    it, as in the repository, so path-based locals see the real sources."""
    module = tmp_path / "terraform"
    if not module.exists():
        module.mkdir()
        for name in ("variables.tf", "locals.tf"):
            shutil.copy(TF_DIR / name, module / name)
        for name in ("cloud", "flwr_kd"):
            (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
        (module / "probe.tf").write_text(
            'output "locals" {\n  value = {\n'
            + "".join(
                f"    {k} = local.{k}\n"
                for k in (
                    "arch_slug",
                    "client_data_prefix",
                    "arrays_bucket",
                    "sources_bucket",
                    "logs_bucket",
                    "client_read_condition",
                    "client_state_condition",
                    "client_write_condition",
                    "aggregator_read_condition",
                    "aggregator_write_condition",
                    "common_env",
                    "source_files",
                )
            )
            + "    prefix = var.name_prefix\n    clients = var.clients\n  }\n}\n"
        )
        (tmp_path / "tf.rc").write_text("")
        init = subprocess.run(
            [_terraform(), "init", "-backend=false", "-input=false", "-no-color"],
            cwd=module,
            capture_output=True,
            check=False,
            text=True,
            env={**TF_ENV, "TF_CLI_CONFIG_FILE": str(tmp_path / "tf.rc")},
            timeout=120,
        )
        assert init.returncode == 0, init.stdout + init.stderr
    return subprocess.run(
        [
            _terraform(),
            "apply",
            "-auto-approve",
            "-input=false",
            "-no-color",
            f"-var-file={EXAMPLE_TFVARS}",
            *extra_args,
        ],
        cwd=module,
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
        env={**TF_ENV, "TF_CLI_CONFIG_FILE": str(tmp_path / "tf.rc")},
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("tfeval")
    proc = _eval_module(tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = subprocess.run(
        [_terraform(), "output", "-json", "locals"],
        cwd=tmp / "terraform",
        capture_output=True,
        check=False,
        text=True,
        env={**TF_ENV, "TF_CLI_CONFIG_FILE": str(tmp / "tf.rc")},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return {"values": json.loads(out.stdout), "tmp": tmp}


def test_example_tfvars_evaluates_to_legal_names(evaluated, tf):
    v = evaluated["values"]
    assert len(v["clients"]) == 3 and len({c["architecture"] for c in v["clients"].values()}) == 3
    prefix = v["prefix"]
    for slug in v["arch_slug"].values():
        name = f"{prefix}-agg-{slug}"
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 49, name
    for cid in v["clients"]:
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", f"{prefix}-client-{cid}")
        assert 6 <= len(f"{prefix}-c-{cid}") <= 30
    for bucket in (v["arrays_bucket"], v["sources_bucket"], v["logs_bucket"]):
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", bucket), bucket
    assert set(v["common_env"]) >= {
        "FLWR_KD_BUCKET",
        "FLWR_KD_FIRESTORE_DATABASE",
        "GOOGLE_CLOUD_PROJECT",
        "FLWR_KD_VERIFY_TOKENS",
    }
    assert v["common_env"]["FLWR_KD_BUCKET"] == v["arrays_bucket"]


def test_each_clients_conditions_name_only_its_own_prefixes(evaluated):
    v = evaluated["values"]
    objects = f"projects/_/buckets/{v['arrays_bucket']}/objects/"
    for cid in v["clients"]:
        read, state, write = (
            v[k][cid]
            for k in ("client_read_condition", "client_state_condition", "client_write_condition")
        )
        assert f'startsWith("{objects}clients/{cid}/data/")' in read
        assert f'startsWith("{objects}clients/{cid}/state/")' in state
        assert f'extract("/rounds/{{round}}/clients/{cid}/") != ""' in write
        for other in set(v["clients"]) - {cid}:
            for condition in (read, state, write):
                assert f"clients/{other}/" not in condition, (cid, other)
        # every term is anchored in the arrays bucket
        for term in re.findall(r'startsWith\("([^"]*)"\)', read + state + write):
            assert term.startswith(objects), term
    assert 'extract("/rounds/{round}/aggregators/") != ""' in v["aggregator_write_condition"]
    assert "clients/" in v["aggregator_read_condition"]


def test_function_sources_hold_cloud_and_flwr_kd(evaluated):
    files = evaluated["values"]["source_files"]
    assert {
        "main.py",
        "requirements.txt",
        "flwr_kd/__init__.py",
        "flwr_kd/serverless/functions/client.py",
    } <= set(files)
    assert not [f for f in files if "__pycache__" in f]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (['-var=architectures=["resnet10t"]'], "Every client's architecture must be listed"),
        (['-var=driver_impersonators=["domain:example.com"]'], "driver_impersonators"),
        (
            [
                '-var=clients={a={architecture="resnet10t",data_prefix="clients/b/data/"}}',
                '-var=architectures=["resnet10t"]',
            ],
            "data_prefix must lie under",
        ),
        (
            ['-var=architectures=["resnet10t","mobilenetv3_small_050","test_vit","test.vit"]'],
            "same function name",
        ),
        (["-var=name_prefix=Flwr_KD"], "name_prefix must be"),
        (
            ['-var=clients={A={architecture="resnet10t"}}', '-var=architectures=["resnet10t"]'],
            "client id must be",
        ),
        (["-var=client_memory=8Gi", "-var=client_cpu=1"], "client_cpu does not fit client_memory"),
    ],
    ids=[
        "arch-not-listed",
        "domain-impersonator",
        "foreign-data-prefix",
        "slug-collision",
        "prefix",
        "client-id",
        "cpu-memory",
    ],
)
def test_validations_reject_bad_inputs(evaluated, args, message):
    proc = _eval_module(evaluated["tmp"], *args)
    assert proc.returncode != 0
    assert message in " ".join((proc.stdout + proc.stderr).split()), proc.stdout + proc.stderr
