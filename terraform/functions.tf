# Isolated mode: one client function per client and one aggregator function per architecture
# (local.services), Cloud Functions gen2, all from the same archive (cloud/ + flwr_kd/); HTTP,
# Python 3.11. Cloud Functions builds each function from source separately: one Cloud Build
# build and one image per function (docs/deploy.md, "Builds"). Pooled mode runs its services on
# Cloud Run from one image instead (services.tf).
#
# Ingress: the driver usually runs outside Google Cloud (a laptop, a CI runner), so the default
# ingress is ALLOW_ALL and access control is by identity: Cloud Run rejects any request without
# a Google ID token of a principal holding roles/run.invoker on the service, and only the
# driver's service account holds it (iam.tf); with verify_tokens the function checks the token's
# e-mail against FLWR_KD_INVOKER too. A driver inside the project's VPC can set
# ingress_settings = "ALLOW_INTERNAL_ONLY".

locals {
  # Client id => its service; architecture => its aggregator (keys as before managed folders,
  # so that existing deployments keep their resource addresses).
  client_functions = {
    for name, s in local.services : trimprefix(s.identity, "client:") => merge(s, { name = name })
    if s.kind == "client" && local.platform == "cloudfunctions"
  }
  aggregator_functions = {
    for name, s in local.services : s.arch => merge(s, { name = name })
    if s.kind == "aggregator" && local.platform == "cloudfunctions"
  }
}

resource "google_cloudfunctions2_function" "client" {
  # checkov:skip=CKV_GCP_124: Ingress is var.ingress_settings (default ALLOW_ALL) because the driver runs outside Google Cloud; invocation is restricted by IAM to the driver's service account (roles/run.invoker) and, with verify_tokens, by the function's own ID-token check.
  for_each = local.client_functions

  project     = var.project
  location    = var.region
  name        = each.value.name
  description = "flwr-kd client ${each.key} (${each.value.arch})"

  build_config {
    runtime         = "python311"
    entry_point     = "client"
    service_account = google_service_account.build.id

    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    available_memory   = var.client_memory
    available_cpu      = var.client_cpu
    timeout_seconds    = each.value.timeout_seconds
    min_instance_count = 0
    # One instance serving one request at a time: a client is one node, and a request that
    # finds its call still "running" then knows the earlier attempt died (FLWR_KD_ONE_INSTANCE).
    max_instance_count               = each.value.max_instances
    max_instance_request_concurrency = each.value.concurrency
    ingress_settings                 = var.ingress_settings
    all_traffic_on_latest_revision   = true
    service_account_email            = local.service_account_emails[each.value.identity]

    environment_variables = merge(local.common_env, {
      FLWR_KD_INVOKER      = google_service_account.driver.email
      FLWR_KD_CLIENT_ID    = each.key
      FLWR_KD_ARCH         = each.value.arch
      FLWR_KD_DATA_PREFIX  = local.client_data_prefix[each.key]
      FLWR_KD_ONE_INSTANCE = "1"
    })
  }

  depends_on = [
    google_project_iam_member.build,
    google_project_iam_member.build_sources,
    google_project_service.enabled,
  ]
}

resource "google_cloudfunctions2_function" "aggregator" {
  # checkov:skip=CKV_GCP_124: Ingress is var.ingress_settings (default ALLOW_ALL) because the driver runs outside Google Cloud; invocation is restricted by IAM to the driver's service account (roles/run.invoker) and, with verify_tokens, by the function's own ID-token check.
  for_each = local.aggregator_functions

  project     = var.project
  location    = var.region
  name        = each.value.name
  description = "flwr-kd aggregator for ${each.key}"

  build_config {
    runtime         = "python311"
    entry_point     = "aggregator"
    service_account = google_service_account.build.id

    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    available_memory                 = var.aggregator_memory
    available_cpu                    = var.aggregator_cpu
    timeout_seconds                  = each.value.timeout_seconds
    min_instance_count               = 0
    max_instance_count               = each.value.max_instances
    max_instance_request_concurrency = each.value.concurrency
    ingress_settings                 = var.ingress_settings
    all_traffic_on_latest_revision   = true
    service_account_email            = local.service_account_emails[each.value.identity]

    environment_variables = merge(local.common_env, {
      FLWR_KD_INVOKER = google_service_account.driver.email
      FLWR_KD_ARCH    = each.key
    })
  }

  depends_on = [
    google_project_iam_member.build,
    google_project_iam_member.build_sources,
    google_project_service.enabled,
  ]
}
