# Pooled mode's one image: the function sources (the archive storage.tf uploads) built once by
# Cloud Build with Google Cloud's buildpacks, the build Cloud Run functions runs for each
# function, into an Artifact Registry repository of this module; every service of services.tf
# runs it. Tagged by the archive's MD5, so a changed source is a new image and a new revision of
# every service. Terraform has no resource that runs a build, so `gcloud builds submit` does it
# (the gcloud CLI is a prerequisite, docs/deploy.md) with image.cloudbuild.yaml.

locals {
  image = local.platform == "cloudrun" ? format(
    "%s-docker.pkg.dev/%s/%s/flwr-kd:%s",
    var.region, var.project, one(google_artifact_registry_repository.images[*].repository_id),
    data.archive_file.source.output_md5,
  ) : null
}

resource "google_artifact_registry_repository" "images" {
  # checkov:skip=CKV_GCP_84: The images hold only this repository's code and public pinned packages, no data; they are encrypted at rest with Google-managed keys like the rest of the module, and a customer key would add Cloud KMS cost and key administration for no confidentiality gain.
  count = local.platform == "cloudrun" ? 1 : 0

  project       = var.project
  location      = var.region
  repository_id = "${var.name_prefix}-images"
  format        = "DOCKER"
  description   = "flwr-kd service images (pooled mode), one per source version."

  # Storage is billed per GiB-month: keep the three newest images, delete the rest after a week.
  cleanup_policy_dry_run = false
  cleanup_policies {
    id     = "keep-newest"
    action = "KEEP"
    most_recent_versions {
      keep_count = 3
    }
  }
  cleanup_policies {
    id     = "delete-older"
    action = "DELETE"
    condition {
      tag_state  = "ANY"
      older_than = "604800s"
    }
  }

  depends_on = [google_project_service.enabled]
}

resource "terraform_data" "image" {
  count = local.platform == "cloudrun" ? 1 : 0

  triggers_replace = [local.image]

  provisioner "local-exec" {
    command = join(" ", [
      "gcloud builds submit",
      "gs://${google_storage_bucket.sources.name}/${google_storage_bucket_object.source.name}",
      "--project=${var.project}",
      "--region=${var.region}",
      "--config=${path.module}/image.cloudbuild.yaml",
      "--substitutions=_IMAGE=${local.image}",
      "--service-account=${google_service_account.build.id}",
    ])
  }

  depends_on = [
    google_artifact_registry_repository.images,
    google_project_iam_member.build,
    google_project_iam_member.build_sources,
  ]
}
