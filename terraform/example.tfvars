# terraform apply -var-file=example.tfvars  (copy it and set your project id first)
project     = "my-flwr-kd-project"
region      = "europe-west1"
name_prefix = "flwr-kd"

# Isolated mode (the default): three clients of three architectures, each with its own function,
# service account and managed folder clients/<id>/ in the arrays bucket, where the driver
# uploads its private data (clients/<id>/data/). example-pooled.tfvars: the pooled mode.
clients = {
  alice = { architecture = "resnet10t" }
  bob   = { architecture = "mobilenetv3_small_050" }
  carol = { architecture = "test_vit" }
}
architectures = ["resnet10t", "mobilenetv3_small_050", "test_vit"]

client_memory     = "2Gi"
client_cpu        = "1"
aggregator_memory = "4Gi"
aggregator_cpu    = "2"
timeout_seconds   = 540
max_instances     = 1
retention_days    = 14

# Who may run the driver (impersonate its service account):
driver_impersonators = ["user:you@example.com"]
