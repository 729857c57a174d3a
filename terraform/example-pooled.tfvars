# terraform apply -var-file=example-pooled.tfvars  (copy it and set your project id first)
# Pooled mode: one service per architecture serves many simulated clients (research runs);
# the driver runs `flwr-kd cloud run --clients 1000 ...` against it.
project         = "my-flwr-kd-project"
region          = "europe-west1"
name_prefix     = "flwr-kd"
deployment_mode = "pooled"

# client-0 ... client-999; client i has architectures[i % 3] and its data under
# pools/<architecture>/clients/client-<i>/ in the arrays bucket.
pool_clients       = 1000
architectures      = ["resnet10t", "mobilenetv3_small_050", "test_vit"]
pool_max_instances = 10

client_memory     = "2Gi"
client_cpu        = "1"
aggregator_memory = "4Gi"
aggregator_cpu    = "2"
timeout_seconds   = 540
max_instances     = 1
retention_days    = 14

# Who may run the driver (impersonate its service account):
driver_impersonators = ["user:you@example.com"]
