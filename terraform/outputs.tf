# Read by `flwr-kd cloud run` (terraform output -json); names fixed by docs/serverless.md.

output "client_function_urls" {
  description = "Client id => HTTPS URL of its function."
  value       = { for id, f in google_cloudfunctions2_function.client : id => f.service_config[0].uri }
}

output "client_architectures" {
  description = "Client id => timm architecture name."
  value       = { for id, c in var.clients : id => c.architecture }
}

output "aggregator_function_urls" {
  description = "Architecture => HTTPS URL of its aggregator function."
  value       = { for arch, f in google_cloudfunctions2_function.aggregator : arch => f.service_config[0].uri }
}

output "arrays_bucket" {
  description = "Bucket of public data, client data and state, and run arrays."
  value       = google_storage_bucket.arrays.name
}

output "sources_bucket" {
  description = "Bucket of the function source archives."
  value       = google_storage_bucket.sources.name
}

output "driver_service_account" {
  description = "E-mail of the driver's service account: the only invoker of the functions."
  value       = google_service_account.driver.email
}

output "project" {
  description = "Project id."
  value       = var.project
}

output "region" {
  description = "Region of the functions and buckets."
  value       = var.region
}

output "firestore_database" {
  description = "Firestore database id of the round store."
  value       = google_firestore_database.runs.name
}

output "logs_bucket" {
  description = "Bucket of the Cloud Storage access logs."
  value       = google_storage_bucket.logs.name
}

output "client_service_accounts" {
  description = "Client id => e-mail of its function's service account."
  value       = { for id, sa in google_service_account.client : id => sa.email }
}

output "aggregator_service_account" {
  description = "E-mail of the aggregators' service account."
  value       = google_service_account.aggregator.email
}
