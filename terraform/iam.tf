# Who may do what. Every member is one of this module's service accounts, a principal listed in
# var.driver_impersonators, or Google's storage-log writer group; nothing is public.
#
# Arrays bucket (conditions: locals.tf):
#   driver      read/write/delete everything (it uploads data and drives the runs)
#   client <id> read  public/, its data prefix, runs/*/rounds/*/messages/<id>/
#               read, replace clients/<id>/state/ (its FedMD model, replaced in place with a
#                     generation precondition: replacing needs delete, hence objectUser)
#               create runs/*/rounds/*/clients/<id>/ (create-only: objectCreator can neither
#                     overwrite nor delete)
#   aggregators read  public/, runs/*/rounds/*/clients/ (logits, weights),
#                     runs/*/rounds/*/aggregators/ (task inputs)
#               create runs/*/rounds/*/aggregators/ (students)
# Object-name conditions do not apply to listing (its resource is the bucket), so the functions
# can read and create the objects they are given names of, and list nothing.

resource "google_storage_bucket_iam_member" "driver_arrays" {
  bucket = google_storage_bucket.arrays.name
  role   = "roles/storage.objectUser"
  member = google_service_account.driver.member
}

resource "google_storage_bucket_iam_member" "client_read" {
  for_each = var.clients

  bucket = google_storage_bucket.arrays.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.client[each.key].member

  condition {
    title       = "client-${each.key}-read"
    description = "Public data, its own private data, and message payloads."
    expression  = local.client_read_condition[each.key]
  }
}

resource "google_storage_bucket_iam_member" "client_state" {
  for_each = var.clients

  bucket = google_storage_bucket.arrays.name
  role   = "roles/storage.objectUser"
  member = google_service_account.client[each.key].member

  condition {
    title       = "client-${each.key}-state"
    description = "Its own state between rounds, replaced in place."
    expression  = local.client_state_condition[each.key]
  }
}

resource "google_storage_bucket_iam_member" "client_write" {
  for_each = var.clients

  bucket = google_storage_bucket.arrays.name
  role   = "roles/storage.objectCreator"
  member = google_service_account.client[each.key].member

  condition {
    title       = "client-${each.key}-write"
    description = "Only its own outputs of each round, create-only."
    expression  = local.client_write_condition[each.key]
  }
}

resource "google_storage_bucket_iam_member" "aggregator_read" {
  bucket = google_storage_bucket.arrays.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.aggregator.member

  condition {
    title       = "aggregator-read"
    description = "Public data, clients' logits and weights, and aggregation tasks."
    expression  = local.aggregator_read_condition
  }
}

resource "google_storage_bucket_iam_member" "aggregator_write" {
  bucket = google_storage_bucket.arrays.name
  role   = "roles/storage.objectCreator"
  member = google_service_account.aggregator.member

  condition {
    title       = "aggregator-write"
    description = "Only aggregation outputs (student models)."
    expression  = local.aggregator_write_condition
  }
}

# Firestore: the driver and the functions read and write run metadata, in this database only.
resource "google_project_iam_member" "firestore_user" {
  for_each = merge(
    { driver = google_service_account.driver.member, aggregator = google_service_account.aggregator.member },
    { for id in keys(var.clients) : "client-${id}" => google_service_account.client[id].member },
  )

  project = var.project
  role    = "roles/datastore.user"
  member  = each.value

  condition {
    title       = "firestore-${var.firestore_database}-only"
    description = "Only the flwr-kd Firestore database."
    expression  = "resource.name == \"projects/${var.project}/databases/${var.firestore_database}\""
  }
}

# Invocation: only the driver. Gen2 functions are Cloud Run services; roles/run.invoker on each
# service is what authorizes a call (Cloud Run rejects every unauthenticated request).
resource "google_cloud_run_v2_service_iam_member" "client_invoker" {
  for_each = var.clients

  project  = var.project
  location = var.region
  name     = google_cloudfunctions2_function.client[each.key].name
  role     = "roles/run.invoker"
  member   = google_service_account.driver.member
}

resource "google_cloud_run_v2_service_iam_member" "aggregator_invoker" {
  for_each = toset(var.architectures)

  project  = var.project
  location = var.region
  name     = google_cloudfunctions2_function.aggregator[each.key].name
  role     = "roles/run.invoker"
  member   = google_service_account.driver.member
}

# People (or a CI identity) who run the driver act as its service account: they may mint its
# access and ID tokens, nothing else. No keys are created.
resource "google_service_account_iam_member" "driver_impersonators" {
  for_each = toset(var.driver_impersonators)

  service_account_id = google_service_account.driver.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = each.value
}

# Builds: write logs and images, read the function sources. Storage reads are limited to the
# sources bucket and the gcf-v2-sources-* buckets Cloud Functions stages sources in, so a build
# (which runs pip) never sees the arrays bucket.
resource "google_project_iam_member" "build" {
  for_each = toset(["roles/logging.logWriter", "roles/artifactregistry.writer"])

  project = var.project
  role    = each.value
  member  = google_service_account.build.member
}

resource "google_project_iam_member" "build_sources" {
  project = var.project
  role    = "roles/storage.objectViewer"
  member  = google_service_account.build.member

  condition {
    title       = "function-sources-only"
    description = "The module's sources bucket and Cloud Functions' staging buckets."
    expression = join(" || ", [
      "resource.name.startsWith(\"projects/_/buckets/${local.sources_bucket}/objects/\")",
      "resource.name.startsWith(\"projects/_/buckets/gcf-v2-sources-\")",
    ])
  }
}
