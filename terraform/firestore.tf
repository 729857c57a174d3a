# Run, round and invocation metadata (docs/serverless.md, "Firestore").
resource "google_firestore_database" "runs" {
  project     = var.project
  name        = var.firestore_database
  location_id = local.firestore_location
  type        = "FIRESTORE_NATIVE"

  # Round documents are written with Increment / ArrayUnion and create-only writes;
  # optimistic concurrency suits the few transactions (resume bookkeeping).
  concurrency_mode                  = "OPTIMISTIC"
  app_engine_integration_mode       = "DISABLED"
  point_in_time_recovery_enablement = "POINT_IN_TIME_RECOVERY_ENABLED"
  delete_protection_state           = var.firestore_deletion_protection ? "DELETE_PROTECTION_ENABLED" : "DELETE_PROTECTION_DISABLED"
  deletion_policy                   = "DELETE"

  depends_on = [google_project_service.enabled]
}

# The round store lists a run's rounds by status in round order (resume: the last done round,
# the rounds still running): runs/{run}/rounds where status == X order by round.
# Invocations are queried by status alone, which Firestore's automatic single-field indexes
# serve, so they need no resource here.
resource "google_firestore_index" "rounds_by_status" {
  project     = var.project
  database    = google_firestore_database.runs.name
  collection  = "rounds"
  query_scope = "COLLECTION"

  fields {
    field_path = "status"
    order      = "ASCENDING"
  }

  fields {
    field_path = "round"
    order      = "ASCENDING"
  }
}
