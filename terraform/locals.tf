# The deployment's description, from variables only (no resource attributes): who exists, which
# managed folder grants whom what, who may use Firestore, and which services run. iam.tf,
# functions.tf, services.tf and outputs.tf build from it, and the emulated stack applies the same
# values (flwr_kd/serverless/policy.py evaluates variables.tf + locals.tf with the terraform
# binary, without any provider, as tests/test_terraform.py does).
locals {
  isolated = var.deployment_mode == "isolated"

  # Service names are Cloud Run service names: lowercase letters, digits and '-'.
  arch_slug = {
    for a in var.architectures : a => trim(replace(lower(a), "/[^a-z0-9]+/", "-"), "-")
  }

  # Client id -> architecture. Pooled: client-<i> has architectures[i % n], the architecture
  # flwr_kd's ExperimentConfig.arch_of_partition gives partition i.
  client_arch = local.isolated ? { for id, c in var.clients : id => c.architecture } : {
    for i in range(var.pool_clients) : "client-${i}" => var.architectures[i % length(var.architectures)]
  }

  # Pooled: one pool per architecture, slug => architecture.
  pools = local.isolated ? {} : { for a in var.architectures : local.arch_slug[a] => a }

  # Each client's root in the arrays bucket (flwr_kd.serverless.names.client_root): its data/,
  # inbox/, state/ and outbox/ lie under it.
  client_roots = {
    for id, a in local.client_arch :
    id => local.isolated ? "clients/${id}/" : "pools/${local.arch_slug[a]}/clients/${id}/"
  }
  client_data_prefix = {
    for id, root in local.client_roots : id => coalesce(try(var.clients[id].data_prefix, null), "${root}data/")
  }

  # ---------------------------------------------------------------- identities
  # Identity key => service account id (6-30 characters). A pool's id is <prefix>-p-<slug>, or,
  # where that is longer than 30 characters, the slug cut short plus 4 hex digits of its SHA-256
  # (mobilenetv3_small_050 with prefix flwr-kd: flwr-kd-p-mobilenetv3-s-<hash>).
  pool_account_id = {
    for slug in keys(local.pools) : slug => (
      length("${var.name_prefix}-p-${slug}") <= 30 ? "${var.name_prefix}-p-${slug}" : format(
        "%s-p-%s-%s", var.name_prefix, trim(substr(slug, 0, 22 - length(var.name_prefix)), "-"), substr(sha256(slug), 0, 4)
      )
    )
  }
  account_ids = merge(
    { driver = "${var.name_prefix}-driver", aggregator = "${var.name_prefix}-aggregator" },
    { for id in keys(local.isolated ? var.clients : {}) : "client:${id}" => "${var.name_prefix}-c-${id}" },
    { for slug, account in local.pool_account_id : "pool:${slug}" => account },
  )
  # Identity key => e-mail: driver, aggregator, client:<id> (isolated), pool:<slug> (pooled).
  identities = {
    for key, account in local.account_ids : key => "${account}@${var.project}.iam.gserviceaccount.com"
  }
  client_identities = [for key in keys(local.identities) : key if startswith(key, "client:")]
  pool_identities   = [for key in keys(local.identities) : key if startswith(key, "pool:")]

  # ---------------------------------------------------------------- Cloud Storage
  # Who may do what in the arrays bucket (docs/deploy.md, "Who may do what"): one grant per
  # (managed folder, role, identity); folder "" is the bucket. Managed folders carry IAM policies
  # of their own, so no grant needs an IAM condition and no policy grows with the client count
  # except public/'s, which holds one principal per client (1,500 allowed). Role permissions:
  # objectViewer get + list; objectCreator create only (no overwrite: that needs delete);
  # objectUser get, list, create, update, delete.
  viewer  = "roles/storage.objectViewer"
  creator = "roles/storage.objectCreator"
  user    = "roles/storage.objectUser"
  storage_grants = concat(
    # The driver uploads data, writes messages and tasks, reads replies, and alone uses runs/.
    [{ folder = "", role = local.user, identity = "driver" }],
    [
      for key in concat(["aggregator"], local.client_identities, local.pool_identities) :
      { folder = "public/", role = local.viewer, identity = key }
    ],
    flatten([
      for key in local.client_identities : [
        # Its root: private data and the driver's messages (inbox/); nothing of other clients.
        { folder = local.client_roots[trimprefix(key, "client:")], role = local.viewer, identity = key },
        # Its state between rounds, replaced in place.
        { folder = "${local.client_roots[trimprefix(key, "client:")]}state/", role = local.user, identity = key },
        # Replies and call records: created once, never overwritten; aggregators read them.
        { folder = "${local.client_roots[trimprefix(key, "client:")]}outbox/", role = local.creator, identity = key },
        { folder = "${local.client_roots[trimprefix(key, "client:")]}outbox/", role = local.viewer, identity = "aggregator" },
      ]
    ]),
    flatten([
      for key in local.pool_identities : [
        # A pool serves all its clients: their roots lie under its own folder.
        { folder = "pools/${trimprefix(key, "pool:")}/", role = local.user, identity = key },
        { folder = "pools/${trimprefix(key, "pool:")}/", role = local.viewer, identity = "aggregator" },
      ]
    ]),
    # Aggregation tasks (the driver writes them) and results with their call records.
    [
      { folder = "aggregators/", role = local.viewer, identity = "aggregator" },
      { folder = "aggregators/", role = local.creator, identity = "aggregator" },
    ],
  )
  managed_folders = distinct([for g in local.storage_grants : g.folder if g.folder != ""])

  # ---------------------------------------------------------------- Firestore
  # Firestore IAM stops at the database: only the driver writes run, round and invocation
  # records (from the call records the functions leave in their outboxes).
  firestore_identities = ["driver"]

  # ---------------------------------------------------------------- project roles
  # Before round 1 the driver checks that every service is ready: it reads them through the
  # Cloud Functions API (isolated) or the Cloud Run Admin API (pooled).
  project_roles = {
    driver = [local.isolated ? "roles/cloudfunctions.viewer" : "roles/run.viewer"]
  }

  # ---------------------------------------------------------------- services
  # Service (function) name => what it is. Isolated clients run one instance, one request at a
  # time (a client is one node); pools and aggregators scale to their max_instances, one request
  # per instance. Only the driver may invoke any of them.
  services = merge(
    {
      for key in local.client_identities : "${var.name_prefix}-client-${trimprefix(key, "client:")}" => {
        kind            = "client"
        identity        = key
        arch            = local.client_arch[trimprefix(key, "client:")]
        client_root     = local.client_roots[trimprefix(key, "client:")]
        max_instances   = 1
        concurrency     = 1
        timeout_seconds = var.timeout_seconds
        invokers        = ["driver"]
      }
    },
    {
      for slug, arch in local.pools : "${var.name_prefix}-pool-${slug}" => {
        kind            = "pool"
        identity        = "pool:${slug}"
        arch            = arch
        client_root     = "pools/${slug}/"
        max_instances   = var.pool_max_instances
        concurrency     = 1
        timeout_seconds = var.timeout_seconds
        invokers        = ["driver"]
      }
    },
    {
      for arch in var.architectures : "${var.name_prefix}-agg-${local.arch_slug[arch]}" => {
        kind            = "aggregator"
        identity        = "aggregator"
        arch            = arch
        client_root     = null
        max_instances   = var.max_instances
        concurrency     = 1
        timeout_seconds = var.timeout_seconds
        invokers        = ["driver"]
      }
    },
  )

  # Where the services run, and how many image builds a deployment takes. Isolated: Cloud
  # Functions gen2, which builds every function from source separately (one build and one image
  # per function). Pooled: Cloud Run services from one image, built once by Cloud Build from the
  # same sources (build.tf; docs/deploy.md, "Builds").
  platform     = local.isolated ? "cloudfunctions" : "cloudrun"
  image_builds = local.isolated ? length(local.services) : 1

  # Deterministic bucket names (known at plan time).
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

  # Environment shared by every service (docs/serverless.md); functions.tf and services.tf add
  # the driver's e-mail (FLWR_KD_INVOKER) and the per-service variables.
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
