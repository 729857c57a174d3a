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
      format(local.cel_under, "clients/${id}/state/"),
      # Message arrays addressed to a client: their names carry a message id, not the client
      # id, so every client may read runs/*/rounds/*/messages/ (the driver's payloads: global
      # models or consensus logits, never another client's data or outputs).
      format(local.cel_in_round, "messages/"),
    ])
  }
  client_write_condition = {
    for id in keys(var.clients) : id => join(" || ", [
      format(local.cel_under, "clients/${id}/state/"),
      format(local.cel_in_round, "clients/${id}/"),
    ])
  }
  aggregator_read_condition = join(" || ", [
    format(local.cel_under, "public/"),
    format(local.cel_in_round, "clients/"),
    format(local.cel_in_round, "aggregators/"),
  ])
  aggregator_write_condition = format(local.cel_in_round, "aggregators/")

  # Environment of the functions: exactly the variables of docs/serverless.md.
  common_env = {
    FLWR_KD_BUCKET             = local.arrays_bucket
    FLWR_KD_FIRESTORE_DATABASE = var.firestore_database
    GOOGLE_CLOUD_PROJECT       = var.project
    FLWR_KD_VERIFY_TOKENS      = var.verify_tokens ? "1" : "0"
    FLWR_KD_INVOKER            = google_service_account.driver.email
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
}
