"""Static checks of the Terraform module in terraform/ (no provider can be downloaded here).

- the services: Cloud Functions (isolated) and Cloud Run services from one image (pooled), all
  generated from `local.services`; entry points, environment variables and outputs against
  docs/serverless.md and the code;
- identities and grants: no public member anywhere, every IAM member is one of the module's own,
  storage access only through `local.storage_grants` (managed folders, no IAM conditions),
  Firestore for `local.firestore_identities`, invocation for each service's invokers;
- `terraform fmt -check`, checkov with no failed check (skips only inline, with a reason);
- the module's variables and locals evaluated by Terraform itself (a provider-less copy:
  variables.tf + locals.tf) on example.tfvars, including validations that must reject, and on
  generated tfvars of 500 isolated and 1,000 pooled clients, whose policies, services and builds
  are checked against Google's documented limits (constants below, with their sources).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path

import hcl2
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from flwr_kd.serverless.policy import apply_module, module_output, prepare_module

ROOT = Path(__file__).resolve().parents[1]
TF_DIR = ROOT / "terraform"
CONTRACT = ROOT / "docs" / "serverless.md"
CLOUD_MAIN = ROOT / "cloud" / "main.py"
FUNCTION_REQUIREMENTS = ROOT / "cloud" / "requirements.txt"
EXAMPLE_TFVARS = TF_DIR / "example.tfvars"
IMAGE_BUILD = TF_DIR / "image.cloudbuild.yaml"
PUBLIC_MEMBERS = ("allusers", "allauthenticatedusers")
# Google's own writer of Cloud Storage usage logs (needed on the logs bucket under UBLA).
STORAGE_LOG_WRITER = "group:cloud-storage-analytics@google.com"
STORAGE_ROLES = {
    "viewer": "roles/storage.objectViewer",
    "creator": "roles/storage.objectCreator",
    "user": "roles/storage.objectUser",
}

# Terraform without network: no version check, no user CLI config.
TF_ENV = {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1", "TF_INPUT": "0"}

# ------------------------------------------------------------------------------ Google's limits
# Documented limits the deployments must fit (docs/deploy.md, "Limits", quotes each source).
#: Principals in all role bindings of one allow policy, each appearance counted.
#: https://cloud.google.com/iam/quotas (Limits: "Allow policies and role bindings")
IAM_PRINCIPALS_PER_POLICY = 1500
#: "Don't add more than 100 conditional role bindings to a single allow policy".
#: https://cloud.google.com/iam/docs/conditions-overview (limitations)
IAM_CONDITIONAL_BINDINGS_PER_POLICY = 100
#: Role bindings with the same role and principal but different conditions, per allow policy.
#: https://cloud.google.com/iam/quotas
IAM_SAME_ROLE_AND_PRINCIPAL_WITH_CONDITIONS = 20
#: Managed folders nest up to 15 levels; a name has at most 700 bytes (the stricter of the
#: figures the page has given). https://cloud.google.com/storage/docs/managed-folders
MANAGED_FOLDER_MAX_DEPTH = 15
MANAGED_FOLDER_MAX_NAME_BYTES = 700
#: Cloud Run services per project and region. https://cloud.google.com/run/quotas
CLOUD_RUN_SERVICES_PER_REGION = 1000
#: Cloud Run functions (2nd gen) per region: 1,000 minus the Cloud Run services deployed.
#: https://cloud.google.com/functions/quotas
FUNCTIONS_PLUS_SERVICES_PER_REGION = 1000
#: Cloud Run service names: at most 49 characters. https://cloud.google.com/run/docs/deploying
SERVICE_NAME_MAX = 49
#: Service account ids: 6-30 characters. https://cloud.google.com/iam/quotas (Limits)
SERVICE_ACCOUNT_ID_MAX = 30
#: Concurrent builds in Cloud Build's default pool: 10 to 30 per project, cannot be raised.
#: https://cloud.google.com/build/quotas
CLOUD_BUILD_CONCURRENT_BUILDS = 30
#: Cloud Run functions (2nd gen) API write calls (deploy, delete): 60 per minute per region.
#: https://cloud.google.com/functions/quotas (Rate limits)
FUNCTIONS_WRITE_CALLS_PER_MINUTE = 60


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


def _run_service(tf: dict) -> dict:
    """The Cloud Run services (pooled mode): one resource, for_each over the services."""
    services = tf["resource"].get("google_cloud_run_v2_service", {})
    assert set(services) == {"service"}, services
    return services["service"]


def _dynamic(body: dict, name: str) -> dict:
    """The `dynamic "<name>"` block of a body."""
    found = [d[name] for d in body.get("dynamic", []) if name in d]
    assert len(found) == 1, f"expected one dynamic '{name}' block"
    return found[0]


def _map_keys(expr) -> set[str]:
    """Keys of a map written in HCL: a dict (a literal), or an expression string such as
    `${merge(local.x, {A = ..., B = ...})}` whose literal keys and `local.*` maps count."""
    if isinstance(expr, dict):
        return set(expr)
    assert isinstance(expr, str), expr
    keys = set(re.findall(r"[{,]\s*([A-Z][A-Z0-9_]*)\s*=", expr))
    return keys


def _expr_env_names(tf: dict, expr) -> set[str]:
    names = _map_keys(expr)
    if isinstance(expr, str):
        for local in re.findall(r"local\.([a-z_][a-z0-9_]*)", expr):
            names |= _map_keys(tf["locals"][local])
    return names


def _env_names(tf: dict, function: dict) -> set[str]:
    """Names of the environment variables a function resource sets."""
    return _expr_env_names(tf, _block(function, "service_config")["environment_variables"])


def _service_env_names(tf: dict) -> set[str]:
    """Names of the environment variables the Cloud Run services set (pools and aggregators)."""
    container = _block(_block(_run_service(tf), "template"), "containers")
    return _expr_env_names(tf, _dynamic(container, "env")["for_each"])


def _contract_functions() -> dict[str, tuple[str, set[str]]]:
    """Function kind -> (entry point, environment variables it reads), from the table in
    docs/serverless.md."""
    table: dict[str, tuple[str, set[str]]] = {}
    for line in CONTRACT.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`[a-z_]+`", cells[1]):
            env = set(re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[3]))
            table[cells[0].strip("`")] = (cells[1].strip("`"), env)
    assert {"client", "pool", "aggregator"} <= set(table), f"function table not in {CONTRACT}"
    return table


def _contract_outputs() -> set[str]:
    text = CONTRACT.read_text()
    section = text.split("## Terraform outputs", 1)[1]
    names = set(re.findall(r"^\|\s*`([a-z_]+)`", section.split("\n## ", 1)[0], re.MULTILINE))
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


def _all_env_names(tf: dict) -> set[str]:
    return _service_env_names(tf).union(*(_env_names(tf, f) for f in _functions(tf).values()))


# ------------------------------------------------------------------------------ services


def test_services_are_generated_from_local_services(tf):
    """Isolated: a Cloud Function per client and per architecture; pooled: Cloud Run services
    (pools and aggregators); all from local.services, so that the emulated stack runs the same."""
    by_entry = _function_by_entry_point(tf)
    assert set(by_entry) == {"client", "aggregator"}
    assert by_entry["client"]["for_each"] == "${local.client_functions}"
    assert by_entry["aggregator"]["for_each"] == "${local.aggregator_functions}"
    for name in ("client_functions", "aggregator_functions"):
        assert "local.services" in tf["locals"][name] and "cloudfunctions" in tf["locals"][name]
    for body in _functions(tf).values():
        build = _block(body, "build_config")
        assert build["runtime"] == "python311"
        storage = _block(_block(build, "source"), "storage_source")
        assert storage["object"] == "${google_storage_bucket_object.source.name}"
        service = _block(body, "service_config")
        assert service["ingress_settings"] == "${var.ingress_settings}"
        assert service["service_account_email"] == (
            "${local.service_account_emails[each.value.identity]}"
        )
        assert service["max_instance_count"] == "${each.value.max_instances}"
        assert service["max_instance_request_concurrency"] == "${each.value.concurrency}"
    run = _run_service(tf)
    assert run["for_each"] == "${local.image_services}"
    assert "cloudrun" in tf["locals"]["image_services"]
    assert run["ingress"] == "${local.run_ingress[var.ingress_settings]}"
    assert run["deletion_protection"] is False
    template = _block(run, "template")
    assert template["service_account"] == "${local.service_account_emails[each.value.identity]}"
    assert _block(template, "scaling")["max_instance_count"] == "${each.value.max_instances}"
    assert template["max_instance_request_concurrency"] == "${each.value.concurrency}"
    assert _block(template, "containers")["image"] == "${local.image}"


def test_pooled_services_run_one_image_built_once(tf):
    """One Cloud Build build per source version (build.tf): the same buildpacks build as Cloud
    Run functions, Python 3.11 like the functions' runtime, pushed to the module's repository."""
    build = tf["resource"]["terraform_data"]["image"]
    assert build["count"] == '${local.platform == "cloudrun" ? 1 : 0}'
    assert build["triggers_replace"] == ["${local.image}"]
    command = _block(build, "provisioner")["local-exec"]["command"]
    for part in ("gcloud builds submit", "image.cloudbuild.yaml", "_IMAGE=${local.image}"):
        assert part in command, command
    assert "${google_storage_bucket_object.source.name}" in command
    assert "data.archive_file.source.output_md5" in tf["locals"]["image"]
    config = yaml.safe_load(IMAGE_BUILD.read_text())
    (step,) = config["steps"]
    assert step["entrypoint"] == "pack" and step["args"][:2] == ["build", "${_IMAGE}"]
    assert "--env=GOOGLE_FUNCTION_TARGET=client" in step["args"]
    assert "--env=GOOGLE_PYTHON_VERSION=3.11.x" in step["args"]
    assert config["images"] == ["${_IMAGE}"]
    # A build running as a user-specified service account must log to Cloud Logging only.
    assert config["options"]["logging"] == "CLOUD_LOGGING_ONLY"
    runtimes = {_block(f, "build_config")["runtime"] for f in _functions(tf).values()}
    assert runtimes == {"python311"}


def test_every_reference_resolves(tf):
    """Without the provider `terraform validate` cannot run here: at least every resource,
    data source, local and variable the module names must be defined."""
    code = "\n".join(
        line.split(" #")[0]
        for path in sorted(TF_DIR.glob("*.tf"))
        for line in path.read_text().splitlines()
        if not line.strip().startswith("#")
    )
    defined = {f"{rtype}.{name}" for rtype, named in tf["resource"].items() for name in named}
    for rtype, name in set(re.findall(r"\b((?:google|terraform)_[a-z0-9_]+)\.([a-z0-9_]+)", code)):
        assert f"{rtype}.{name}" in defined, f"undefined resource {rtype}.{name}"
    data = {f"{dtype}.{name}" for dtype, named in tf["data"].items() for name in named}
    for dtype, name in set(re.findall(r"\bdata\.([a-z0-9_]+)\.([a-z0-9_]+)", code)):
        assert f"{dtype}.{name}" in data, f"undefined data source {dtype}.{name}"
    for name in set(re.findall(r"\blocal\.([a-z0-9_]+)", code)):
        assert name in tf["locals"], f"undefined local.{name}"
    for name in set(re.findall(r"\bvar\.([a-z0-9_]+)", code)):
        assert name in tf["variable"], f"undefined var.{name}"


def test_variables_are_validated(tf):
    variables = tf["variable"]
    for name in (
        "project",
        "region",
        "name_prefix",
        "deployment_mode",
        "clients",
        "pool_clients",
        "pool_max_instances",
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
    container = _block(_block(_run_service(tf), "template"), "containers")
    targets = set(re.findall(r'"(client|aggregator)"', _dynamic(container, "env")["for_each"]))
    contract = {entry for entry, _ in _contract_functions().values()}
    assert entry_points == targets == contract, "entry points differ from docs/serverless.md"
    missing = entry_points - defined
    assert not missing, f"cloud/main.py defines no top-level function {sorted(missing)}"


# ------------------------------------------------------------------------------ environment


def test_functions_set_every_contract_variable(tf):
    by_entry = _function_by_entry_point(tf)
    service_env = _service_env_names(tf)
    for kind, (entry_point, names) in _contract_functions().items():
        if kind != "pool":
            missing = names - _env_names(tf, by_entry[entry_point])
            assert not missing, f"{kind} function lacks {sorted(missing)} (docs/serverless.md)"
        if kind != "client":
            missing = names - service_env
            assert not missing, f"{kind} service lacks {sorted(missing)} (docs/serverless.md)"


def test_functions_set_every_variable_the_code_reads(tf):
    read = _env_vars_in_code(_code_files())
    assert "FLWR_KD_BUCKET" in read, (
        "found no FLWR_KD_* read in the function code: is the scan broken?"
    )
    missing = read - _all_env_names(tf)
    assert not missing, f"the code reads {sorted(missing)}, which no function sets"


def test_code_reads_every_variable_terraform_sets(tf):
    """Each FLWR_KD_* variable set on a function or service is read somewhere in cloud/ or
    flwr_kd/: a variable nothing reads means the code and the contract drifted apart."""
    read = _env_vars_in_code(
        [*sorted((ROOT / "cloud").rglob("*.py")), *sorted((ROOT / "flwr_kd").rglob("*.py"))]
    )
    unread = {n for n in _all_env_names(tf) if n.startswith("FLWR_KD_")} - read
    assert not unread, (
        f"Terraform sets {sorted(unread)} but no code under cloud/ or flwr_kd/ reads it"
    )


# ------------------------------------------------------------------------------ requirements

#: What only the driver or the simulation use: never in the functions' image.
NOT_IN_FUNCTIONS = {
    "flwr-datasets",
    "datasets",
    "scikit-learn",
    "scipy",
    "pandas",
    "pyarrow",
    "matplotlib",
    "google-cloud-firestore",
}


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.exists()), None)


def _imports(path: Path, everywhere: bool) -> set[str]:
    """Modules `path` imports: what importing it runs (module level, class bodies, if/try
    blocks), and with `everywhere` also inside its functions (the serverless code, whose lazy
    imports run during requests)."""
    names: set[str] = set()
    todo: list[ast.AST] = [ast.parse(path.read_text(), filename=str(path))]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        if everywhere or not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            todo += ast.iter_child_nodes(node)
    return names


def _function_imports() -> set[str]:
    """Third-party modules the function code imports: cloud/main.py and the flwr_kd modules it
    reaches (module-level imports; inside functions too for flwr_kd.serverless)."""
    todo, seen, third = ["main"], set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = CLOUD_MAIN if name == "main" else _module_file(name)
        if path is None:
            continue
        everywhere = name == "main" or name.startswith("flwr_kd.serverless")
        for module in _imports(path, everywhere):
            top = module.split(".")[0]
            if top == "flwr_kd":
                parts = module.split(".")
                todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            elif top not in sys.stdlib_module_names and top != "__future__":
                third.add(module)
    return third


def _distribution_of(module: str, owners: dict[str, str]) -> str | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        owner = owners.get(".".join(parts[:i]))
        if owner:
            return owner
    return None


def _requirements_closure() -> set[str]:
    """cloud/requirements.txt's distributions and everything they require (as installed)."""
    todo = [
        Requirement(line.split("#")[0].strip()).name
        for line in FUNCTION_REQUIREMENTS.read_text().splitlines()
        if line.split("#")[0].strip() and not line.startswith("-")
    ]
    closure: set[str] = set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in closure:
            continue
        closure.add(name)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return closure


def test_function_requirements_cover_what_the_functions_import_and_no_more():
    """Every distribution the function code imports is in cloud/requirements.txt or required by
    it; nothing only the driver or the simulation uses is imported or required."""
    owners: dict[str, str] = {}
    for dist in metadata.distributions():
        for file in dist.files or []:
            path = str(file)
            if path.endswith("/__init__.py"):
                module = path[: -len("/__init__.py")].replace("/", ".")
            elif path.endswith(".py") and "/" not in path:
                module = path[:-3]
            else:
                continue
            if module not in ("google", "google.cloud"):  # namespaces shared by many
                owners.setdefault(module, canonicalize_name(dist.metadata["Name"]))
    imported = {_distribution_of(m, owners) for m in _function_imports()} - {None}
    assert {"flwr", "torch", "timm", "google-cloud-storage", "google-auth"} <= imported, imported
    closure = _requirements_closure()
    assert not imported - closure, f"cloud/requirements.txt lacks {sorted(imported - closure)}"
    assert not imported & NOT_IN_FUNCTIONS, sorted(imported & NOT_IN_FUNCTIONS)
    direct = {
        canonicalize_name(Requirement(line).name)
        for line in FUNCTION_REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.startswith(("#", "-"))
    }
    assert not direct & NOT_IN_FUNCTIONS, sorted(direct & NOT_IN_FUNCTIONS)
    for line in FUNCTION_REQUIREMENTS.read_text().splitlines():
        if line.strip() and not line.startswith(("#", "-")):
            assert "==" in line, f"unpinned function requirement: {line}"
    # flwr, torch and torchvision as the project pins them (pyproject.toml).
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name in ("flwr", "torch", "torchvision"):
        pin = re.search(rf"^{name}==(\S+)$", FUNCTION_REQUIREMENTS.read_text(), re.MULTILINE)
        assert pin, f"cloud/requirements.txt does not pin {name}"
        assert re.search(rf'"{name}(\[[a-z,]+\])?=={re.escape(pin[1])}"', pyproject), name


# ------------------------------------------------------------------------------ outputs, data


def test_outputs_cover_the_contract(tf):
    contract = _contract_outputs()
    missing = contract - set(tf["output"])
    assert not missing, f"outputs.tf lacks {sorted(missing)} (docs/serverless.md)"
    undocumented = set(tf["output"]) - contract
    assert not undocumented, f"docs/serverless.md's outputs table lacks {sorted(undocumented)}"
    for name in ("client_roots", "client_data_prefixes", "service_urls", "service_accounts"):
        assert name in contract


def test_buckets_are_private_versioned_and_logged_when_asked(tf):
    buckets = tf["resource"]["google_storage_bucket"]
    assert {"arrays", "sources", "logs"} <= set(buckets)
    for name, body in buckets.items():
        assert body["uniform_bucket_level_access"] is True, name
        assert body["public_access_prevention"] == "enforced", name
        assert _block(body, "versioning")["enabled"] is True, name
    # Usage logs are optional (var.access_logging): the logs bucket and its writer exist only
    # with it, and the other two buckets log into it whenever it exists.
    assert buckets["logs"]["count"] == "${var.access_logging ? 1 : 0}"
    writer = tf["resource"]["google_storage_bucket_iam_member"]["logs_writer"]
    assert writer["count"] == "${var.access_logging ? 1 : 0}"
    assert tf["variable"]["access_logging"]["default"] is False
    assert "domain-restricted" in tf["variable"]["access_logging"]["description"]
    for name in ("arrays", "sources"):
        logging = _dynamic(buckets[name], "logging")
        assert logging["for_each"] == "${google_storage_bucket.logs}"
        assert _block(logging, "content")["log_bucket"] == "${logging.value.name}"
    rules = [
        _block(rule, "condition")
        for rule in buckets["arrays"]["lifecycle_rule"]
        if _block(rule, "action")["type"] == "Delete"
    ]
    assert any(
        c.get("age") == "${var.retention_days}"
        and c.get("matches_prefix") == "${local.run_prefixes}"
        for c in rules
    )
    assert any(c.get("days_since_custom_time") == "${var.retention_days}" for c in rules)
    assert "runs/" in tf["locals"]["run_prefixes"]


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
    # local.members: identity key -> the member of one of the module's service accounts.
    members_map = tf["locals"]["members"]
    sa_member = r"google_service_account\.[a-z_]+\.member|sa\.member"
    assert re.search(sa_member, members_map)
    rest = re.sub(sa_member, "", members_map)
    assert not re.search(r"(user|group|domain|serviceAccount|principal\w*):|var\.", rest), rest
    members = list(_iam_members(tf))
    assert len(members) >= 8
    for where, body, member in members:
        assert isinstance(member, str), where
        if re.fullmatch(r"\$\{google_service_account\.[a-z_]+\.member\}", member):
            continue
        if re.fullmatch(r"\$\{local\.members\[each\.(key|value\.identity)\]\}", member):
            continue
        if member == STORAGE_LOG_WRITER:
            continue
        if member == "${each.value}":
            # principals that may act as the driver, restricted by the variable's validation
            assert body["for_each"] == "${toset(var.driver_impersonators)}", where
            continue
        raise AssertionError(f"{where}: unexpected IAM member {member!r}")


def test_only_the_services_invokers_invoke_them(tf):
    invokers = {
        f"{rtype}.{name}": body
        for rtype, named in tf["resource"].items()
        for name, body in named.items()
        if body.get("role") in ("roles/run.invoker", "roles/cloudfunctions.invoker")
    }
    assert set(invokers) == {"google_cloud_run_v2_service_iam_member.invoker"}, set(invokers)
    (body,) = invokers.values()
    assert "local.services" in body["for_each"] and "s.invokers" in body["for_each"]
    assert body["member"] == "${local.members[each.value.identity]}"
    assert body["name"] == "${local.deployed_services[each.value.service]}"
    deployed = tf["locals"]["deployed_services"]
    for resource in (
        "google_cloudfunctions2_function.client",
        "google_cloudfunctions2_function.aggregator",
        "google_cloud_run_v2_service.service",
    ):
        assert resource in deployed, f"run.invoker is never granted on {resource}"


def test_storage_and_firestore_access_come_from_the_locals_without_conditions(tf):
    """Storage: one binding per local.storage_grants entry, on the bucket ("" folder) or a
    managed folder, none conditional; Firestore: local.firestore_identities."""
    bucket = tf["resource"]["google_storage_bucket_iam_member"]["arrays"]
    folder = tf["resource"]["google_storage_managed_folder_iam_member"]["arrays"]
    for body in (bucket, folder):
        assert "local.storage_grants" in body["for_each"], body["for_each"]
        assert body["role"] == "${each.value.role}"
        assert body["member"] == "${local.members[each.value.identity]}"
        assert "condition" not in body
    assert 'g.folder == ""' in bucket["for_each"] and 'g.folder != ""' in folder["for_each"]
    assert folder["managed_folder"] == "${local.managed_folder_names[each.value.folder]}"
    arrays_bindings = [
        name
        for name, body in tf["resource"]["google_storage_bucket_iam_member"].items()
        if body["bucket"] == "${google_storage_bucket.arrays.name}"
    ]
    assert arrays_bindings == ["arrays"]
    firestore = tf["resource"]["google_project_iam_member"]["firestore_user"]
    assert firestore["for_each"] == "${toset(local.firestore_identities)}"
    assert firestore["role"] == "roles/datastore.user"


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


#: What the evaluation outputs: these locals, and two variables.
PROBE = {
    **{
        k: f"local.{k}"
        for k in (
            "arch_slug",
            "client_arch",
            "client_roots",
            "client_data_prefix",
            "arrays_bucket",
            "sources_bucket",
            "logs_bucket",
            "identities",
            "storage_grants",
            "managed_folders",
            "firestore_identities",
            "project_roles",
            "services",
            "platform",
            "image_builds",
            "common_env",
            "source_files",
        )
    },
    "prefix": "var.name_prefix",
    "clients": "var.clients",
}


def _eval_module(tmp_path: Path, *extra_args: str, var_file: Path = EXAMPLE_TFVARS):
    """Apply variables.tf + locals.tf (no provider, no resource) with `var_file`, and output
    the locals (`flwr_kd.serverless.policy` evaluates the module the same way)."""
    return apply_module(prepare_module(tmp_path, PROBE, TF_DIR), var_file, *extra_args)


def _evaluate(tmp_path: Path, tfvars: dict) -> dict:
    """The probed locals for a generated tfvars (written as JSON, which Terraform reads)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    var_file = tmp_path / "generated.tfvars.json"
    var_file.write_text(json.dumps(tfvars))
    proc = _eval_module(tmp_path, var_file=var_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return module_output(tmp_path / "terraform")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("tfeval")
    proc = _eval_module(tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"values": module_output(tmp / "terraform"), "tmp": tmp}


def _account_ids(values: dict) -> list[str]:
    return [email.split("@")[0] for email in values["identities"].values()]


def test_example_tfvars_evaluates_to_legal_names(evaluated, tf):
    v = evaluated["values"]
    assert len(v["clients"]) == 3 and len({c["architecture"] for c in v["clients"].values()}) == 3
    assert v["platform"] == "cloudfunctions"
    prefix = v["prefix"]
    assert set(v["services"]) == {f"{prefix}-client-{cid}" for cid in v["clients"]} | {
        f"{prefix}-agg-{slug}" for slug in v["arch_slug"].values()
    }
    for name in v["services"]:
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
        assert len(name) <= SERVICE_NAME_MAX, name
    for account in _account_ids(v):
        assert re.fullmatch(r"[a-z][-a-z0-9]{4,28}[a-z0-9]", account), account
    assert v["identities"]["client:alice"] == (
        f"{prefix}-c-alice@my-flwr-kd-project.iam.gserviceaccount.com"
    )
    for bucket in (v["arrays_bucket"], v["sources_bucket"], v["logs_bucket"]):
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", bucket), bucket
    assert set(v["common_env"]) >= {
        "FLWR_KD_BUCKET",
        "FLWR_KD_FIRESTORE_DATABASE",
        "GOOGLE_CLOUD_PROJECT",
        "FLWR_KD_VERIFY_TOKENS",
    }
    assert v["common_env"]["FLWR_KD_BUCKET"] == v["arrays_bucket"]


def _grants_by_identity(values: dict) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for g in values["storage_grants"]:
        out.setdefault(g["identity"], set()).add((g["folder"], g["role"]))
    return out


def test_each_clients_grants_name_only_its_own_folders(evaluated):
    """Isolated: a client reads public/ and its own root (data, inbox), replaces its state,
    creates (never overwrites) in its outbox; nothing of another client; the aggregator reads
    outboxes, never data; only the driver holds a bucket-level role, and Firestore."""
    v = evaluated["values"]
    viewer, creator, user = (STORAGE_ROLES[k] for k in ("viewer", "creator", "user"))
    grants = _grants_by_identity(v)
    for cid in v["clients"]:
        root = f"clients/{cid}/"
        assert v["client_roots"][cid] == root
        assert v["client_data_prefix"][cid].startswith(root)
        assert grants[f"client:{cid}"] == {
            ("public/", viewer),
            (root, viewer),
            (f"{root}state/", user),
            (f"{root}outbox/", creator),
        }
        for other in set(v["clients"]) - {cid}:
            assert not [f for f, _ in grants[f"client:{cid}"] if f.startswith(f"clients/{other}/")]
    assert grants["aggregator"] == {
        ("public/", viewer),
        ("aggregators/", viewer),
        ("aggregators/", creator),
        *((f"clients/{cid}/outbox/", viewer) for cid in v["clients"]),
    }
    assert grants["driver"] == {("", user)}
    assert [g for g in v["storage_grants"] if g["folder"] == ""] == [
        {"folder": "", "role": user, "identity": "driver"}
    ]
    assert set(v["managed_folders"]) == {g["folder"] for g in v["storage_grants"]} - {""}
    assert v["firestore_identities"] == ["driver"]
    for service in v["services"].values():
        assert service["invokers"] == ["driver"]
        assert service["identity"] in v["identities"]


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
            [
                '-var=clients={a={architecture="resnet10t",data_prefix="clients/a/outbox/x/"}}',
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
        (["-var=deployment_mode=shared"], "deployment_mode must be"),
        (["-var=deployment_mode=pooled", "-var=pool_clients=10"], "pooled mode takes no clients"),
        (["-var=pool_clients=10"], "isolated mode takes pool_clients = 0"),
        (["-var=deployment_mode=pooled", "-var=clients={}"], "Pooled mode needs pool_clients"),
        (
            [
                "-var=deployment_mode=pooled",
                "-var=clients={}",
                "-var=pool_clients=10",
                "-var=name_prefix=flwr-kd-lab1",
                '-var=architectures=["vit_base_patch16_clip_224_openai"]',
            ],
            "must fit Cloud Run's 49 characters",
        ),
    ],
    ids=[
        "arch-not-listed",
        "domain-impersonator",
        "foreign-data-prefix",
        "data-prefix-in-outbox",
        "slug-collision",
        "prefix",
        "client-id",
        "cpu-memory",
        "mode",
        "pooled-with-clients",
        "isolated-with-pool-clients",
        "pooled-without-clients",
        "pool-service-name",
    ],
)
def test_validations_reject_bad_inputs(evaluated, args, message):
    proc = _eval_module(evaluated["tmp"], *args)
    assert proc.returncode != 0
    assert message in " ".join((proc.stdout + proc.stderr).split()), proc.stdout + proc.stderr


def test_isolated_mode_refuses_more_services_than_cloud_run_allows(evaluated):
    too_many = evaluated["tmp"] / "too-many.tfvars.json"
    clients = {f"c{i}": {"architecture": "resnet10t"} for i in range(998)}
    too_many.write_text(json.dumps({"clients": clients}))
    proc = _eval_module(evaluated["tmp"], f"-var-file={too_many}")
    assert proc.returncode != 0
    message = "clients + architectures must be at most 1,000"
    assert message in " ".join((proc.stdout + proc.stderr).split()), proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ scale

ARCHITECTURES = ["resnet10t", "mobilenetv3_small_050", "test_vit"]


def _arch_of(i: int) -> str:
    """flwr_kd's ExperimentConfig.arch_of_partition for ARCHITECTURES."""
    return ARCHITECTURES[i % len(ARCHITECTURES)]


@pytest.fixture(scope="module")
def at_scale(tmp_path_factory) -> dict[str, dict]:
    """The locals of 500 isolated clients and of 1,000 pooled clients, evaluated by Terraform."""
    tmp = tmp_path_factory.mktemp("tfscale")
    base = {"project": "my-flwr-kd-project", "architectures": ARCHITECTURES}
    isolated = {
        **base,
        "clients": {f"client-{i}": {"architecture": _arch_of(i)} for i in range(500)},
    }
    pooled = {**base, "deployment_mode": "pooled", "pool_clients": 1000}
    return {
        "isolated": _evaluate(tmp / "isolated", isolated),
        "pooled": _evaluate(tmp / "pooled", pooled),
    }


def _deployment_figures(v: dict) -> dict:
    """What a deployment puts against Google's limits, from its evaluated locals (the same
    values iam.tf, functions.tf, services.tf and build.tf generate resources from)."""
    # Principals per allow policy: one policy per managed folder, and the bucket's ("").
    per_policy = Counter(g["folder"] for g in v["storage_grants"])
    # The services' policies hold their invokers; the project's gains the Firestore grants
    # (conditional), the project roles and the build account's three (iam.tf: logWriter,
    # artifactregistry.writer, and objectViewer on the sources, conditional).
    invokers = [len(s["invokers"]) for s in v["services"].values()]
    project_grants = len(v["firestore_identities"]) + sum(map(len, v["project_roles"].values())) + 3
    conditional = Counter(
        [("roles/datastore.user", who) for who in v["firestore_identities"]]
        + [("roles/storage.objectViewer", "build")]
    )
    functions = len(v["services"]) if v["platform"] == "cloudfunctions" else 0
    keys = [(g["folder"], g["role"], g["identity"]) for g in v["storage_grants"]]
    return {
        "max_principals_per_policy": max([*per_policy.values(), *invokers, project_grants]),
        "public_policy_principals": per_policy["public/"],
        "project_policy_principals_added": project_grants,
        "policies": len(per_policy),
        "conditional_bindings_in_project_policy": sum(conditional.values()),
        "max_conditions_per_role_and_principal": max(conditional.values()),
        "duplicate_grants": len(keys) - len(set(keys)),
        "managed_folders": len(v["managed_folders"]),
        "max_folder_depth": max(f.count("/") for f in v["managed_folders"]),
        "max_folder_name_bytes": max(len(f.encode()) for f in v["managed_folders"]),
        "services": len(v["services"]),
        "functions": functions,
        "run_services": len(v["services"]) - functions,
        "service_accounts": len(v["identities"]) + 1,  # and the build account
        "builds": v["image_builds"],
        "longest_service_name": max(map(len, v["services"])),
        "longest_account_id": max(map(len, _account_ids(v))),
    }


def test_500_isolated_clients_fit_googles_limits(at_scale):
    v = at_scale["isolated"]
    f = _deployment_figures(v)
    assert len(v["client_roots"]) == 500 and v["platform"] == "cloudfunctions"
    # public/ is the largest policy: every client and the aggregator.
    assert f["public_policy_principals"] == f["max_principals_per_policy"] == 501
    assert f["max_principals_per_policy"] <= IAM_PRINCIPALS_PER_POLICY
    assert f["policies"] == 1 + 1 + 3 * 500 + 1  # bucket, public/, 3 per client, aggregators/
    # No storage grant is conditional (test_storage_and_firestore_access_come_from_the_locals_
    # without_conditions); the project policy gains two conditional bindings, each role and
    # principal once.
    assert f["conditional_bindings_in_project_policy"] == 2 <= IAM_CONDITIONAL_BINDINGS_PER_POLICY
    assert f["max_conditions_per_role_and_principal"] == 1
    assert f["max_conditions_per_role_and_principal"] <= IAM_SAME_ROLE_AND_PRINCIPAL_WITH_CONDITIONS
    assert f["duplicate_grants"] == 0
    assert f["managed_folders"] == 1 + 3 * 500 + 1
    assert f["max_folder_depth"] == 3 <= MANAGED_FOLDER_MAX_DEPTH
    assert f["max_folder_name_bytes"] <= MANAGED_FOLDER_MAX_NAME_BYTES
    assert f["services"] == f["functions"] == 503 <= CLOUD_RUN_SERVICES_PER_REGION
    assert f["functions"] + f["run_services"] <= FUNCTIONS_PLUS_SERVICES_PER_REGION
    assert f["longest_service_name"] <= SERVICE_NAME_MAX
    assert f["longest_account_id"] <= SERVICE_ACCOUNT_ID_MAX
    # Cloud Functions builds every function from source: one build per function. They queue
    # behind Cloud Build's concurrency, and deploying them takes at least this many minutes of
    # the functions API's write quota (docs/deploy.md, "Builds").
    assert f["builds"] == f["functions"] == 503
    assert math.ceil(f["builds"] / CLOUD_BUILD_CONCURRENT_BUILDS) == 17
    assert math.ceil(f["functions"] / FUNCTIONS_WRITE_CALLS_PER_MINUTE) == 9
    assert f["service_accounts"] == 503


def test_1000_pooled_clients_fit_googles_limits(at_scale):
    v = at_scale["pooled"]
    f = _deployment_figures(v)
    assert v["platform"] == "cloudrun"
    assert len(v["client_roots"]) == 1000
    for i in (0, 1, 2, 999):
        cid, slug = f"client-{i}", v["arch_slug"][_arch_of(i)]
        assert v["client_arch"][cid] == _arch_of(i)
        assert v["client_roots"][cid] == f"pools/{slug}/clients/{cid}/"
    assert f["public_policy_principals"] == 4  # the three pools and the aggregator
    assert f["project_policy_principals_added"] == f["max_principals_per_policy"] == 5
    assert f["max_principals_per_policy"] <= IAM_PRINCIPALS_PER_POLICY
    assert f["conditional_bindings_in_project_policy"] == 2 <= IAM_CONDITIONAL_BINDINGS_PER_POLICY
    assert f["duplicate_grants"] == 0
    assert f["managed_folders"] == 1 + 3 + 1
    assert f["max_folder_depth"] <= MANAGED_FOLDER_MAX_DEPTH
    assert f["services"] == f["run_services"] == 6 <= CLOUD_RUN_SERVICES_PER_REGION
    assert f["functions"] == 0
    assert f["longest_service_name"] <= SERVICE_NAME_MAX
    assert f["longest_account_id"] <= SERVICE_ACCOUNT_ID_MAX
    # One image for every service: a single build, fewer than one per architecture.
    assert f["builds"] == 1 <= len(ARCHITECTURES)
    assert f["service_accounts"] == 2 + 3 + 1
    pools = {n: s for n, s in v["services"].items() if s["kind"] == "pool"}
    assert {s["client_root"] for s in pools.values()} == {
        f"pools/{slug}/" for slug in v["arch_slug"].values()
    }
    grants = _grants_by_identity(v)
    for name, s in pools.items():
        assert grants[s["identity"]] == {
            ("public/", STORAGE_ROLES["viewer"]),
            (s["client_root"], STORAGE_ROLES["user"]),
        }, name
