# Three buckets, all regional, with uniform bucket-level access (required by the IAM
# Conditions in iam.tf) and public access prevention enforced:
#  - logs:    Cloud Storage access logs of the two others;
#  - sources: the zipped function sources (cloud/ + flwr_kd/);
#  - arrays:  public data, clients' private data and state, and every run's arrays.

resource "google_storage_bucket" "logs" {
  # checkov:skip=CKV_GCP_62: This bucket is the access-log sink of the other two; logging it into itself would log every log write, and a further bucket would only move the question.
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

# With uniform bucket-level access, Cloud Storage writes usage logs as this Google-owned group.
resource "google_storage_bucket_iam_member" "logs_writer" {
  bucket = google_storage_bucket.logs.name
  role   = "roles/storage.objectCreator"
  member = "group:cloud-storage-analytics@google.com"
}

resource "google_storage_bucket" "sources" {
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

  logging {
    log_bucket        = google_storage_bucket.logs.name
    log_object_prefix = "sources/"
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

  logging {
    log_bucket        = google_storage_bucket.logs.name
    log_object_prefix = "arrays/"
  }

  # Run arrays (logits, weights, students, message payloads) expire after retention_days.
  lifecycle_rule {
    condition {
      age            = var.retention_days
      matches_prefix = ["runs/"]
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
      matches_prefix = ["runs/"]
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_storage_bucket_iam_member.logs_writer]
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
