# Only variables here (no resource attributes): tests/test_terraform.py evaluates this file with
# variables.tf and example.tfvars, without any provider.
locals {
  # Function names become Cloud Run service names: lowercase letters, digits and '-'.
  arch_slug = {
    for a in var.architectures : a => trim(replace(lower(a), "/[^a-z0-9]+/", "-"), "-")
  }

  # Per client: its private data prefix in the arrays bucket (docs/serverless.md).
  client_data_prefix = {
    for id, c in var.clients : id => coalesce(c.data_prefix, "clients/${id}/data/")
  }

  # Deterministic bucket names (known at plan time, so IAM conditions show in the plan).
  arrays_bucket  = "${var.project}-${var.name_prefix}-arrays"
  sources_bucket = "${var.project}-${var.name_prefix}-sources"
  logs_bucket    = "${var.project}-${var.name_prefix}-logs"

  firestore_location = coalesce(var.firestore_location, var.region)

  # Memory in GiB and the fewest vCPUs Cloud Run allows with it (> 4 GiB: 2, > 8: 4, > 16: 6,
  # > 24: 8); variables.tf checks the *_cpu variables against it.
  memory_units = {
    Gi = 1
    G  = 1000000000 / 1073741824
    Mi = 1 / 1024
    M  = 1000000 / 1073741824
  }
  memory_gib = {
    client     = tonumber(regex("^[0-9]+", var.client_memory)) * local.memory_units[regex("[A-Za-z]+$", var.client_memory)]
    aggregator = tonumber(regex("^[0-9]+", var.aggregator_memory)) * local.memory_units[regex("[A-Za-z]+$", var.aggregator_memory)]
  }
  min_cpu = {
    for role, g in local.memory_gib :
    role => g > 24 ? 8 : g > 16 ? 6 : g > 8 ? 4 : g > 4 ? 2 : 1
  }

  # Cloud Storage IAM Conditions see an object as "projects/_/buckets/<bucket>/objects/<name>".
  # Two CEL helpers (format() templates, %s = a prefix or a path segment):
  #  - cel_under: the object lies under a fixed prefix;
  #  - cel_in_round: the object lies in runs/<run>/rounds/<r>/<segment>. extract() returns the
  #    text between the first "/rounds/" and the next "/<segment>", or "" when there is none,
  #    so the test is "non-empty". Any object this admits has "/<segment>" after "/rounds/" in
  #    its name: a principal allowed ".../clients/<id>/" can only create names that contain
  #    "/clients/<id>/", never the names another client's outputs have.
  objects      = "projects/_/buckets/${local.arrays_bucket}/objects/"
  cel_under    = "resource.name.startsWith(\"${local.objects}%s\")"
  cel_in_round = "(resource.name.startsWith(\"${local.objects}runs/\") && resource.name.extract(\"/rounds/{round}/%s\") != \"\")"

  # What each identity may read and create in the arrays bucket (docs/serverless.md, layout).
  client_read_condition = {
    for id in keys(var.clients) : id => join(" || ", [
      format(local.cel_under, "public/"),
      format(local.cel_under, local.client_data_prefix[id]),
      # Message arrays addressed to this client (runs/<run>/rounds/<r>/messages/<id>/...).
      format(local.cel_in_round, "messages/${id}/"),
    ])
  }
  client_state_condition = {
    for id in keys(var.clients) : id => format(local.cel_under, "clients/${id}/state/")
  }
  client_write_condition = {
    for id in keys(var.clients) : id => format(local.cel_in_round, "clients/${id}/")
  }
  aggregator_read_condition = join(" || ", [
    format(local.cel_under, "public/"),
    format(local.cel_in_round, "clients/"),
    format(local.cel_in_round, "aggregators/"),
  ])
  aggregator_write_condition = format(local.cel_in_round, "aggregators/")

  # Environment shared by both kinds of function (docs/serverless.md); functions.tf adds the
  # driver's e-mail (FLWR_KD_INVOKER) and the per-function variables.
  common_env = {
    FLWR_KD_BUCKET             = local.arrays_bucket
    FLWR_KD_FIRESTORE_DATABASE = var.firestore_database
    GOOGLE_CLOUD_PROJECT       = var.project
    FLWR_KD_VERIFY_TOKENS      = var.verify_tokens ? "1" : "0"
    FLWR_KD_MAX_BODY_BYTES     = tostring(var.max_request_bytes)
    FLWR_KD_TOKEN_CERTS_URL    = "https://www.googleapis.com/oauth2/v1/certs" # Google's ID-token signing keys
  }

  apis = [
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudfunctions.googleapis.com",
    "firestore.googleapis.com",
    "iam.googleapis.com",
    "iamcredentials.googleapis.com",
    "logging.googleapis.com",
    "run.googleapis.com",
    "storage.googleapis.com",
  ]

  # Function sources: cloud/ (main.py, requirements.txt at the archive's root) with the flwr_kd
  # package beside it, so that `import flwr_kd` works in the function. Only text sources are
  # taken (file() reads UTF-8), never __pycache__.
  source_root = abspath("${path.module}/..")
  source_files = merge(
    {
      for f in fileset("${local.source_root}/cloud", "**") :
      f => "${local.source_root}/cloud/${f}"
      if !strcontains(f, "__pycache__") && can(regex("\\.(py|txt|json|toml|cfg|ini|yaml|yml)$", f))
    },
    {
      for f in fileset("${local.source_root}/flwr_kd", "**") :
      "flwr_kd/${f}" => "${local.source_root}/flwr_kd/${f}"
      if !strcontains(f, "__pycache__") && can(regex("\\.(py|typed|json|txt)$", f))
    },
  )
}
