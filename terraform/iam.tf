# Who may do what: everything below is generated from locals.tf (local.storage_grants,
# local.firestore_identities, local.services[*].invokers), the description the emulated stack
# enforces too. Every member is one of this module's service accounts (local.members) or a
# principal listed in var.driver_impersonators; nothing is public.
#
# Arrays bucket: no IAM conditions. The driver holds objectUser on the bucket; every other grant
# is on a managed folder (storage.tf), whose IAM policy applies to the objects under its path:
#   public/                    objectViewer: aggregator, every client, every pool
#   clients/<id>/              objectViewer: client <id> (its data and inbox)
#   clients/<id>/state/        objectUser: client <id> (replaced in place)
#   clients/<id>/outbox/       objectCreator: client <id> (create-only); objectViewer: aggregator
#   pools/<slug>/              objectUser: pool <slug>; objectViewer: aggregator
#   aggregators/               objectViewer + objectCreator: aggregator
#   runs/                      the driver only (bucket-level)

resource "google_storage_bucket_iam_member" "arrays" {
  for_each = { for g in local.storage_grants : "${g.role} ${g.identity}" => g if g.folder == "" }

  bucket = google_storage_bucket.arrays.name
  role   = each.value.role
  member = local.members[each.value.identity]
}

resource "google_storage_managed_folder_iam_member" "arrays" {
  for_each = { for g in local.storage_grants : "${g.folder} ${g.role} ${g.identity}" => g if g.folder != "" }

  bucket         = google_storage_bucket.arrays.name
  managed_folder = local.managed_folder_names[each.value.folder]
  role           = each.value.role
  member         = local.members[each.value.identity]
}

# Firestore: only the driver reads and writes run metadata, in this database only.
resource "google_project_iam_member" "firestore_user" {
  for_each = toset(local.firestore_identities)

  project = var.project
  role    = "roles/datastore.user"
  member  = local.members[each.key]

  condition {
    title       = "firestore-${var.firestore_database}-only"
    description = "Only the flwr-kd Firestore database."
    expression  = "resource.name == \"projects/${var.project}/databases/${var.firestore_database}\""
  }
}

# Project-level read access the driver needs for its readiness check (local.project_roles).
resource "google_project_iam_member" "project_roles" {
  for_each = {
    for pair in flatten([
      for who, roles in local.project_roles : [for role in roles : { identity = who, role = role }]
    ]) : "${pair.role} ${pair.identity}" => pair
  }

  project = var.project
  role    = each.value.role
  member  = local.members[each.value.identity]
}

# Invocation: gen2 functions are Cloud Run services, and roles/run.invoker on a service is what
# authorizes a call (Cloud Run rejects every unauthenticated request). local.services names the
# invokers of each service: the driver, and nobody else.
resource "google_cloud_run_v2_service_iam_member" "invoker" {
  for_each = {
    for pair in flatten([
      for name, s in local.services : [for who in s.invokers : { service = name, identity = who }]
    ]) : "${pair.service} ${pair.identity}" => pair
  }

  project  = var.project
  location = var.region
  name     = local.deployed_services[each.value.service]
  role     = "roles/run.invoker"
  member   = local.members[each.value.identity]
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
