terraform {
  # 1.9: input validations may refer to other variables (clients <-> architectures).
  required_version = ">= 1.9"

  required_providers {
    google = {
      source = "hashicorp/google"
      # 6.x and 7.x: build_config.service_account (>= 5.26), google_firestore_database
      # deletion_policy, service_config.service output-only (7.0). Nothing used here changes
      # in 7.x; 8.0 is not out yet, so it stays excluded until someone has applied with it.
      version = ">= 6.0, < 8.0"
    }
    archive = {
      source  = "hashicorp/archive"
      version = ">= 2.4, < 3.0"
    }
  }
}

provider "google" {
  project = var.project
  region  = var.region

  default_labels = merge({ app = "flwr-kd", deployment = var.name_prefix }, var.labels)
}
