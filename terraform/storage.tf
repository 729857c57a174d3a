# Three buckets, all regional, with uniform bucket-level access (required by managed folders)
# and public access prevention enforced:
#  - logs:    Cloud Storage usage logs of the two others (only with var.access_logging);
#  - sources: the zipped function sources (cloud/ + flwr_kd/);
#  - arrays:  public data, clients' private data and state, and every run's arrays, with one
#             managed folder per prefix that iam.tf grants on (local.managed_folders).

resource "google_storage_bucket" "logs" {
  # checkov:skip=CKV_GCP_62: This bucket is the access-log sink of the other two; logging it into itself would log every log write, and a further bucket would only move the question.
  count = var.access_logging ? 1 : 0

  name                        = local.logs_bucket
  project                     = var.project
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy

  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      age = var.log_retention_days
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      with_state                 = "ARCHIVED"
      days_since_noncurrent_time = 1
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.enabled]
}

# With uniform bucket-level access, Cloud Storage writes usage logs as this Google-owned group:
# the grant that the domain-restricted-sharing organisation policy refuses (var.access_logging).
resource "google_storage_bucket_iam_member" "logs_writer" {
  count = var.access_logging ? 1 : 0

  bucket = google_storage_bucket.logs[0].name
  role   = "roles/storage.objectCreator"
  member = "group:cloud-storage-analytics@google.com"
}

resource "google_storage_bucket" "sources" {
  # checkov:skip=CKV_GCP_62: Usage logs are optional (var.access_logging, off by default): their writer group is refused by the domain-restricted-sharing organisation policy, and Google recommends Cloud Audit Logs instead (docs/deploy.md).
  name                        = local.sources_bucket
  project                     = var.project
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy

  # Keeps the archives that deployed functions were built from.
  versioning {
    enabled = true
  }

  dynamic "logging" {
    for_each = google_storage_bucket.logs
    content {
      log_bucket        = logging.value.name
      log_object_prefix = "sources/"
    }
  }

  # An archive is named by its content hash (a few hundred KB each, kept for rollbacks); only
  # superseded versions of one name are cleaned up.
  lifecycle_rule {
    condition {
      with_state         = "ARCHIVED"
      num_newer_versions = 3
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_storage_bucket_iam_member.logs_writer]
}

resource "google_storage_bucket" "arrays" {
  # checkov:skip=CKV_GCP_62: Usage logs are optional (var.access_logging, off by default): their writer group is refused by the domain-restricted-sharing organisation policy, and Google recommends Cloud Audit Logs instead (docs/deploy.md).
  name                        = local.arrays_bucket
  project                     = var.project
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy

  # Protects private data, public data and client state from a mistaken overwrite or delete
  # (run arrays themselves are written create-only).
  versioning {
    enabled = true
  }

  dynamic "logging" {
    for_each = google_storage_bucket.logs
    content {
      log_bucket        = logging.value.name
      log_object_prefix = "arrays/"
    }
  }

  # Run arrays expire after retention_days: global models (runs/) and aggregation tasks and
  # results (aggregators/) by prefix; messages, replies and call records in client roots'
  # inbox/ and outbox/ by their custom time, when the writer sets it (a prefix rule cannot match
  # them without matching the clients' data and state).
  lifecycle_rule {
    condition {
      age            = var.retention_days
      matches_prefix = local.run_prefixes
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      days_since_custom_time = var.retention_days
    }
    action {
      type = "Delete"
    }
  }

  # A replaced or deleted object's old version goes a week later (run arrays: at once).
  lifecycle_rule {
    condition {
      with_state                 = "ARCHIVED"
      days_since_noncurrent_time = 7
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      with_state     = "ARCHIVED"
      matches_prefix = local.run_prefixes
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_storage_bucket_iam_member.logs_writer]
}

locals {
  # Prefixes that hold only run arrays (the driver's global models, aggregation tasks/results).
  run_prefixes = ["runs/", "aggregators/"]
  # Managed folder path => its resource's name (iam.tf grants on it after it exists).
  managed_folder_names = merge(
    { for path, f in google_storage_managed_folder.top : path => f.name },
    { for path, f in google_storage_managed_folder.nested : path => f.name },
  )
  # A folder nested in another (clients/<id>/state/ in clients/<id>/) is created after it.
  folder_set = { for path in local.managed_folders : path => true }
  nested_folders = toset([
    for path in local.managed_folders : path
    if anytrue([
      for depth in range(1, length(split("/", path)) - 1) :
      lookup(local.folder_set, "${join("/", slice(split("/", path), 0, depth))}/", false)
    ])
  ])
}

# Managed folders: each carries its own IAM policy (iam.tf), covering the objects under its path.
resource "google_storage_managed_folder" "top" {
  for_each = setsubtract(toset(local.managed_folders), local.nested_folders)

  bucket        = google_storage_bucket.arrays.name
  name          = each.key
  force_destroy = var.force_destroy
}

resource "google_storage_managed_folder" "nested" {
  for_each = local.nested_folders

  bucket        = google_storage_bucket.arrays.name
  name          = each.key
  force_destroy = var.force_destroy

  depends_on = [google_storage_managed_folder.top]
}

# Function sources: cloud/ with flwr_kd/ beside it (local.source_files), zipped.
data "archive_file" "source" {
  type        = "zip"
  output_path = "${path.module}/.build/function-source.zip"

  dynamic "source" {
    for_each = local.source_files
    content {
      filename = source.key
      content  = file(source.value)
    }
  }
}

resource "google_storage_bucket_object" "source" {
  # Named by content: a changed source is a new object, which redeploys the functions.
  name         = "functions/source-${data.archive_file.source.output_md5}.zip"
  bucket       = google_storage_bucket.sources.name
  source       = data.archive_file.source.output_path
  content_type = "application/zip"
}
