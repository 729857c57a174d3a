# Read by `flwr-kd cloud run` (terraform output -json; flwr_kd/serverless/deployment.py); the
# table in docs/serverless.md ("Terraform outputs") lists every output and who reads it.

output "deployment_mode" {
  description = "\"isolated\" (one function per client) or \"pooled\" (one service per architecture serves many clients)."
  value       = var.deployment_mode
}

output "client_function_urls" {
  description = "Client id => HTTPS URL the driver calls for that client: its own function (isolated) or its architecture's pool service (pooled)."
  value = local.isolated ? {
    for id, f in google_cloudfunctions2_function.client : id => f.service_config[0].uri
    } : {
    for id, arch in local.client_arch : id => local.service_urls["${var.name_prefix}-pool-${local.arch_slug[arch]}"]
  }
}

output "client_architectures" {
  description = "Client id => timm architecture name."
  value       = local.client_arch
}

output "client_roots" {
  description = "Client id => its root in the arrays bucket (clients/<id>/ or pools/<slug>/clients/<id>/): data/, inbox/, state/, outbox/ lie under it."
  value       = local.client_roots
}

output "client_data_prefixes" {
  description = "Client id => prefix of its private data in the arrays bucket (under its root), where the driver uploads it."
  value       = local.client_data_prefix
}

output "aggregator_function_urls" {
  description = "Architecture => HTTPS URL of its aggregator."
  value = {
    for name, s in local.services : s.arch => local.service_urls[name] if s.kind == "aggregator"
  }
}

output "service_urls" {
  description = "Service (function) name => HTTPS URL, every client, pool and aggregator service."
  value       = local.service_urls
}

output "arrays_bucket" {
  description = "Bucket of public data, client data and state, and run arrays."
  value       = google_storage_bucket.arrays.name
}

output "sources_bucket" {
  description = "Bucket of the function source archives."
  value       = google_storage_bucket.sources.name
}

output "logs_bucket" {
  description = "Bucket of the Cloud Storage usage logs (null without access_logging)."
  value       = one(google_storage_bucket.logs[*].name)
}

output "firestore_database" {
  description = "Firestore database id of the round store (the driver's only)."
  value       = google_firestore_database.runs.name
}

output "service_accounts" {
  description = "Identity key (driver, aggregator, client:<id>, pool:<slug>) => service account e-mail."
  value       = local.service_account_emails
}

output "driver_service_account" {
  description = "E-mail of the driver's service account: the only invoker of the services."
  value       = google_service_account.driver.email
}

output "client_service_accounts" {
  description = "Client id => e-mail of its function's service account (isolated mode)."
  value       = { for id, sa in google_service_account.client : id => sa.email }
}

output "aggregator_service_account" {
  description = "E-mail of the aggregators' service account."
  value       = google_service_account.aggregator.email
}

output "image" {
  description = "Pooled mode: the image every service runs (null in isolated mode)."
  value       = local.image
}

output "project" {
  description = "Project id."
  value       = var.project
}

output "region" {
  description = "Region of the services and buckets."
  value       = var.region
}
