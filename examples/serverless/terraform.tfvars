# The serverless example's deployment: four clients of three architectures, each client a Cloud
# Function with its own service account, and one aggregator function per architecture.
#   cd terraform && terraform apply -var-file=../examples/serverless/terraform.tfvars
# Set `project` (and `driver_impersonators`) to yours first. Every variable: terraform/variables.tf.
project     = "my-flwr-kd-project"
region      = "europe-west1"
name_prefix = "flwr-kd"

# Client ids, sorted, are the partition order: alice gets partition 0, bob 1, and so on. The
# driver uploads each client's private partition under clients/<id>/data/ in the arrays bucket.
clients = {
  alice = { architecture = "resnet10t" }
  bob   = { architecture = "mobilenetv3_small_050" }
  carol = { architecture = "test_vit" }
  dave  = { architecture = "resnet10t" }
}
# One aggregator function each (FedDF's per-architecture distillation); `flwr-kd cloud run
# --archs` must list the same ones (its default does).
architectures = ["resnet10t", "mobilenetv3_small_050", "test_vit"]

client_memory     = "2Gi"
client_cpu        = "1"
aggregator_memory = "4Gi"
aggregator_cpu    = "2"
timeout_seconds   = 540
retention_days    = 14 # run arrays (objects under runs/) expire after this many days

# Who may act as the driver's service account (`flwr-kd cloud run` by impersonation):
driver_impersonators = ["user:you@example.com"]

# Lets `terraform destroy` empty the buckets; apply once with it set before destroying.
force_destroy = false
