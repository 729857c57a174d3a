# One identity per role (docs/serverless.md): the driver, each client, the aggregators, and the
# build of the function images. None has a key; the driver is used by impersonation.

resource "google_service_account" "driver" {
  project      = var.project
  account_id   = "${var.name_prefix}-driver"
  display_name = "flwr-kd driver (${var.name_prefix})"
  description  = "Runs `flwr-kd cloud run`: invokes the functions, uploads data, reads results."

  depends_on = [google_project_service.enabled]
}

resource "google_service_account" "client" {
  for_each = var.clients

  project      = var.project
  account_id   = "${var.name_prefix}-c-${each.key}"
  display_name = "flwr-kd client ${each.key} (${var.name_prefix})"
  description  = "Runtime identity of the client function ${each.key} (${each.value.architecture})."

  depends_on = [google_project_service.enabled]
}

resource "google_service_account" "aggregator" {
  project      = var.project
  account_id   = "${var.name_prefix}-aggregator"
  display_name = "flwr-kd aggregators (${var.name_prefix})"
  description  = "Runtime identity of the per-architecture aggregator functions."

  depends_on = [google_project_service.enabled]
}

resource "google_service_account" "build" {
  project      = var.project
  account_id   = "${var.name_prefix}-build"
  display_name = "flwr-kd function builds (${var.name_prefix})"
  description  = "Cloud Build identity that turns the function sources into images."

  depends_on = [google_project_service.enabled]
}
