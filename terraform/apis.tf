# The APIs the runtime needs. They stay enabled on destroy: other workloads of the project may
# use them, and disabling an API can break what Terraform does not manage.
resource "google_project_service" "enabled" {
  for_each = var.enable_apis ? toset(local.apis) : toset([])

  project            = var.project
  service            = each.value
  disable_on_destroy = false
}
