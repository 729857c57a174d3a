# The fan-out: one client function per client and one aggregator function per architecture,
# all built from the same archive (cloud/ + flwr_kd/). HTTP functions, Python 3.11.
#
# Ingress: the driver usually runs outside Google Cloud (a laptop, a CI runner), so the default
# ingress is ALLOW_ALL and access control is by identity: Cloud Run rejects any request without
# a Google ID token of a principal holding roles/run.invoker on the service, and only the
# driver's service account holds it (iam.tf); with verify_tokens the function checks the token's
# e-mail against FLWR_KD_INVOKER too. A driver inside the project's VPC can set
# ingress_settings = "ALLOW_INTERNAL_ONLY".

resource "google_cloudfunctions2_function" "client" {
  # checkov:skip=CKV_GCP_124: Ingress is var.ingress_settings (default ALLOW_ALL) because the driver runs outside Google Cloud; invocation is restricted by IAM to the driver's service account (roles/run.invoker) and, with verify_tokens, by the function's own ID-token check.
  for_each = var.clients

  project     = var.project
  location    = var.region
  name        = "${var.name_prefix}-client-${each.key}"
  description = "flwr-kd client ${each.key} (${each.value.architecture})"

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
    timeout_seconds    = var.timeout_seconds
    min_instance_count = 0
    # One instance serving one request at a time: a client is one node, and a request that
    # finds its call still "running" then knows the earlier attempt died (FLWR_KD_ONE_INSTANCE).
    max_instance_count               = 1
    max_instance_request_concurrency = 1
    ingress_settings                 = var.ingress_settings
    all_traffic_on_latest_revision   = true
    service_account_email            = google_service_account.client[each.key].email

    environment_variables = merge(local.common_env, {
      FLWR_KD_INVOKER      = google_service_account.driver.email
      FLWR_KD_CLIENT_ID    = each.key
      FLWR_KD_ARCH         = each.value.architecture
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
  for_each = toset(var.architectures)

  project     = var.project
  location    = var.region
  name        = "${var.name_prefix}-agg-${local.arch_slug[each.key]}"
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
    timeout_seconds                  = var.timeout_seconds
    min_instance_count               = 0
    max_instance_count               = var.max_instances
    max_instance_request_concurrency = 1
    ingress_settings                 = var.ingress_settings
    all_traffic_on_latest_revision   = true
    service_account_email            = google_service_account.aggregator.email

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
