# One identity per role (local.identities; docs/serverless.md): the driver, the aggregators,
# each isolated client or each pool, and the build of the function images. None has a key; the
# driver is used by impersonation. Account ids come from locals.tf, so the emulated stack and
# this module name the same accounts.

resource "google_service_account" "driver" {
  project      = var.project
  account_id   = local.account_ids["driver"]
  display_name = "flwr-kd driver (${var.name_prefix})"
  description  = "Runs `flwr-kd cloud run`: invokes the functions, uploads data, reads results."

  depends_on = [google_project_service.enabled]
}

resource "google_service_account" "client" {
  for_each = { for key in local.client_identities : trimprefix(key, "client:") => local.account_ids[key] }

  project      = var.project
  account_id   = each.value
  display_name = "flwr-kd client ${each.key} (${var.name_prefix})"
  description  = "Runtime identity of the client function ${each.key} (${local.client_arch[each.key]})."

  depends_on = [google_project_service.enabled]
}

resource "google_service_account" "pool" {
  for_each = { for key in local.pool_identities : trimprefix(key, "pool:") => local.account_ids[key] }

  project      = var.project
  account_id   = each.value
  display_name = "flwr-kd pool ${each.key} (${var.name_prefix})"
  description  = "Runtime identity of the pool service of ${local.pools[each.key]}: all its simulated clients."

  depends_on = [google_project_service.enabled]
}

resource "google_service_account" "aggregator" {
  project      = var.project
  account_id   = local.account_ids["aggregator"]
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

locals {
  # Identity key => the service account resource's "serviceAccount:<email>" member and e-mail
  # (local.identities has the same e-mails; these carry the dependency on the account).
  members = merge(
    { driver = google_service_account.driver.member, aggregator = google_service_account.aggregator.member },
    { for id, sa in google_service_account.client : "client:${id}" => sa.member },
    { for slug, sa in google_service_account.pool : "pool:${slug}" => sa.member },
  )
  service_account_emails = merge(
    { driver = google_service_account.driver.email, aggregator = google_service_account.aggregator.email },
    { for id, sa in google_service_account.client : "client:${id}" => sa.email },
    { for slug, sa in google_service_account.pool : "pool:${slug}" => sa.email },
  )
}
