# Pooled mode: every service of local.services (one pool and one aggregator per architecture) is
# a Cloud Run service running the one image build.tf builds, its entry point chosen by
# FUNCTION_TARGET (functions-framework reads it; the buildpack's build-time target is only its
# default). Same limits as the isolated functions: request-based billing (CPU only during
# requests), one request per instance, scale to zero. A pool serves all its simulated clients;
# each request names the client, whose root pools/<slug>/clients/<id>/ lies in the pool's folder.

locals {
  image_services = { for name, s in local.services : name => s if local.platform == "cloudrun" }

  # var.ingress_settings as Cloud Run names the same settings.
  run_ingress = {
    ALLOW_ALL               = "INGRESS_TRAFFIC_ALL"
    ALLOW_INTERNAL_ONLY     = "INGRESS_TRAFFIC_INTERNAL_ONLY"
    ALLOW_INTERNAL_AND_GCLB = "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"
  }

  # Service name => the deployed service's name and URL, whichever platform runs it (iam.tf grants
  # run.invoker on it once it exists; outputs.tf reports the URLs).
  deployed_services = merge(
    { for f in google_cloudfunctions2_function.client : f.name => f.name },
    { for f in google_cloudfunctions2_function.aggregator : f.name => f.name },
    { for s in google_cloud_run_v2_service.service : s.name => s.name },
  )
  service_urls = merge(
    { for f in google_cloudfunctions2_function.client : f.name => f.service_config[0].uri },
    { for f in google_cloudfunctions2_function.aggregator : f.name => f.service_config[0].uri },
    { for s in google_cloud_run_v2_service.service : s.name => s.uri },
  )
}

resource "google_cloud_run_v2_service" "service" {
  for_each = local.image_services

  project             = var.project
  location            = var.region
  name                = each.key
  description         = "flwr-kd ${each.value.kind} for ${each.value.arch}"
  ingress             = local.run_ingress[var.ingress_settings]
  deletion_protection = false

  template {
    service_account                  = local.service_account_emails[each.value.identity]
    timeout                          = "${each.value.timeout_seconds}s"
    max_instance_request_concurrency = each.value.concurrency

    scaling {
      min_instance_count = 0
      max_instance_count = each.value.max_instances
    }

    containers {
      image = local.image

      resources {
        limits = {
          cpu    = each.value.kind == "aggregator" ? var.aggregator_cpu : var.client_cpu
          memory = each.value.kind == "aggregator" ? var.aggregator_memory : var.client_memory
        }
        cpu_idle = true
      }

      dynamic "env" {
        for_each = merge(
          local.common_env,
          {
            FUNCTION_TARGET = each.value.kind == "aggregator" ? "aggregator" : "client"
            FLWR_KD_INVOKER = google_service_account.driver.email
            FLWR_KD_ARCH    = each.value.arch
          },
          { for k, v in { FLWR_KD_POOL = trimprefix(each.value.identity, "pool:") } : k => v if each.value.kind == "pool" },
        )
        content {
          name  = env.key
          value = env.value
        }
      }
    }
  }

  depends_on = [terraform_data.image, google_project_service.enabled]
}
