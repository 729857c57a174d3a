# Inputs of the flwr-kd serverless module. Names of deployed things derive from `name_prefix`,
# client ids and architecture names, so most validations below keep those names legal for
# Cloud Storage, IAM and Cloud Run (function names become Cloud Run service names).

variable "project" {
  description = "Google Cloud project id to deploy into."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project))
    error_message = "project must be a project id: 6-30 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "region" {
  description = "Region of the functions, the buckets and (unless firestore_location is set) the Firestore database."
  type        = string
  default     = "europe-west1"

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+$", var.region))
    error_message = "region must be a single Google Cloud region such as europe-west1 or us-central1 (not a multi-region)."
  }
}

variable "name_prefix" {
  description = "Prefix of every name this module creates (functions, service accounts, buckets)."
  type        = string
  default     = "flwr-kd"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,10}[a-z0-9]$", var.name_prefix))
    error_message = "name_prefix must be 3-12 lowercase letters, digits or hyphens, start with a letter and not end with a hyphen."
  }
}

variable "deployment_mode" {
  description = <<-EOT
    How clients are deployed. "isolated" (cross-silo): one client function and one service
    account per entry of `clients`, each client's data behind its own managed folders.
    "pooled" (research runs with many simulated clients): one pool service and one service
    account per architecture serves `pool_clients` clients, client-<i> of architecture
    architectures[i % n], each under its own prefix pools/<arch>/clients/<id>/.
  EOT
  type        = string
  default     = "isolated"

  validation {
    condition     = contains(["isolated", "pooled"], var.deployment_mode)
    error_message = "deployment_mode must be \"isolated\" or \"pooled\"."
  }
}

variable "clients" {
  description = <<-EOT
    Isolated mode: the federation's clients, client id => { architecture (a timm model name
    listed in `architectures`), data_prefix (optional; the client's private data prefix in the
    arrays bucket, under its root clients/<id>/, default `clients/<id>/data/`) }. One client
    function and one service account each. Pooled mode: leave empty (see pool_clients).
  EOT
  type = map(object({
    architecture = string
    data_prefix  = optional(string)
  }))
  default = {}

  validation {
    condition     = var.deployment_mode == "pooled" ? length(var.clients) == 0 : length(var.clients) >= 1
    error_message = "Isolated mode needs 1 or more clients; pooled mode takes no clients (set pool_clients instead)."
  }

  validation {
    # Function "<prefix>-client-<id>" and service account "<prefix>-c-<id>" stay within the
    # 49- and 30-character limits with a 12-character prefix.
    condition     = alltrue([for id in keys(var.clients) : can(regex("^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$", id))])
    error_message = "Each client id must be 1-15 lowercase letters, digits or hyphens, not starting or ending with a hyphen."
  }

  validation {
    condition     = alltrue([for c in values(var.clients) : can(regex("^[A-Za-z0-9][A-Za-z0-9_.-]*$", c.architecture))])
    error_message = "Each client's architecture must be a timm model name (letters, digits, '_', '.', '-')."
  }

  validation {
    # A client's whole root clients/<id>/ is readable to it (its own managed folder), so an
    # override may move its data anywhere under the root except into the folders with other
    # roles and meanings: state/ (read-write), inbox/ (the driver's messages), outbox/ (replies).
    condition = alltrue([
      for id, c in var.clients : c.data_prefix == null ? true : (
        startswith(c.data_prefix, "clients/${id}/") &&
        endswith(c.data_prefix, "/") &&
        !anytrue([for sub in ["state/", "inbox/", "outbox/"] : startswith(c.data_prefix, "clients/${id}/${sub}")]) &&
        length(c.data_prefix) > length("clients/${id}/")
      )
    ])
    error_message = "A client's data_prefix must lie under clients/<id>/ (not clients/<id>/ itself, nor its state/, inbox/ or outbox/) and end with '/'."
  }
}

variable "pool_clients" {
  description = "Pooled mode: the number of simulated clients (client-0 ... client-<n-1>, as `flwr-kd cloud run --clients n` names them). Isolated mode: 0."
  type        = number
  default     = 0

  validation {
    condition     = var.pool_clients >= 0 && var.pool_clients <= 10000 && floor(var.pool_clients) == var.pool_clients
    error_message = "pool_clients must be a whole number from 0 to 10,000."
  }

  validation {
    condition     = var.deployment_mode == "pooled" ? var.pool_clients >= 1 : var.pool_clients == 0
    error_message = "Pooled mode needs pool_clients >= 1; isolated mode takes pool_clients = 0 (its clients are in `clients`)."
  }
}

variable "pool_max_instances" {
  description = "Pooled mode: maximum instances of each pool service (each serves one request at a time), i.e. how many of a pool's clients train at once."
  type        = number
  default     = 10

  validation {
    condition     = var.pool_max_instances >= 1 && var.pool_max_instances <= 100 && floor(var.pool_max_instances) == var.pool_max_instances
    error_message = "pool_max_instances must be a whole number from 1 to 100."
  }
}

variable "architectures" {
  description = "timm model names of the architectures in the federation: one aggregator (and, pooled, one pool service) each. Every client's architecture must be listed."
  type        = list(string)

  validation {
    condition     = length(var.architectures) >= 1 && length(distinct(var.architectures)) == length(var.architectures)
    error_message = "architectures must list at least one architecture, each once."
  }

  validation {
    # The function is named "<prefix>-agg-<arch with every run of other characters as '-'>".
    condition     = alltrue([for a in var.architectures : can(regex("^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$", a))])
    error_message = "Each architecture must be a timm model name of at most 32 characters (letters, digits, '_', '.', '-')."
  }

  validation {
    condition = length(distinct([
      for a in var.architectures : trim(replace(lower(a), "/[^a-z0-9]+/", "-"), "-")
    ])) == length(var.architectures)
    error_message = "Two architectures map to the same function name once lowercased and with '_' and '.' replaced by '-'."
  }

  validation {
    condition     = alltrue([for c in values(var.clients) : contains(var.architectures, c.architecture)])
    error_message = "Every client's architecture must be listed in architectures."
  }

  validation {
    # Each isolated client is a Cloud Run service (gen2 functions are), and so is each
    # aggregator: 1,000 services per project and region (docs/deploy.md, "Limits").
    condition     = length(var.clients) + length(var.architectures) <= 1000
    error_message = "clients + architectures must be at most 1,000: Cloud Run allows 1,000 services per project and region (shared with any other service there); use deployment_mode = \"pooled\" for more clients."
  }

  validation {
    # Cloud Run service names have at most 49 characters; "<prefix>-agg-<slug>" always fits.
    condition = var.deployment_mode != "pooled" || alltrue([
      for a in var.architectures : length("${var.name_prefix}-pool-${trim(replace(lower(a), "/[^a-z0-9]+/", "-"), "-")}") <= 49
    ])
    error_message = "In pooled mode each pool service \"<name_prefix>-pool-<architecture>\" must fit Cloud Run's 49 characters: shorten name_prefix."
  }
}

variable "client_memory" {
  description = "Memory of each client function (Cloud Run units: M, Mi, G, Gi)."
  type        = string
  default     = "2Gi"

  validation {
    condition     = can(regex("^[1-9][0-9]*(M|Mi|G|Gi)$", var.client_memory))
    error_message = "client_memory must look like 512Mi, 2Gi or 4G."
  }
}

variable "aggregator_memory" {
  description = "Memory of each aggregator function (distillation holds the public set, the logits and one student)."
  type        = string
  default     = "4Gi"

  validation {
    condition     = can(regex("^[1-9][0-9]*(M|Mi|G|Gi)$", var.aggregator_memory))
    error_message = "aggregator_memory must look like 512Mi, 2Gi or 4G."
  }
}

variable "client_cpu" {
  description = "vCPUs of each client function (must fit client_memory, see the validation)."
  type        = string
  default     = "1"

  validation {
    condition     = contains(["1", "2", "4", "6", "8"], var.client_cpu)
    error_message = "client_cpu must be one of 1, 2, 4, 6, 8."
  }

  validation {
    # Cloud Run: more memory needs more vCPUs, and 4 vCPUs need >= 2 GiB, 6 or 8 need >= 4 GiB.
    condition = (
      tonumber(var.client_cpu) >= local.min_cpu["client"] &&
      local.memory_gib["client"] <= 32 &&
      local.memory_gib["client"] >= (tonumber(var.client_cpu) >= 6 ? 4 : tonumber(var.client_cpu) >= 4 ? 2 : 0.125)
    )
    error_message = "client_cpu does not fit client_memory: above 4 GiB Cloud Run needs >= 2 vCPUs, above 8 GiB >= 4, above 16 GiB >= 6, above 24 GiB 8 (at most 32 GiB); 4 vCPUs need >= 2 GiB, 6 or 8 need >= 4 GiB; at least 128 MiB."
  }
}

variable "aggregator_cpu" {
  description = "vCPUs of each aggregator function (must fit aggregator_memory, see the validation)."
  type        = string
  default     = "2"

  validation {
    condition     = contains(["1", "2", "4", "6", "8"], var.aggregator_cpu)
    error_message = "aggregator_cpu must be one of 1, 2, 4, 6, 8."
  }

  validation {
    # Cloud Run: more memory needs more vCPUs, and 4 vCPUs need >= 2 GiB, 6 or 8 need >= 4 GiB.
    condition = (
      tonumber(var.aggregator_cpu) >= local.min_cpu["aggregator"] &&
      local.memory_gib["aggregator"] <= 32 &&
      local.memory_gib["aggregator"] >= (tonumber(var.aggregator_cpu) >= 6 ? 4 : tonumber(var.aggregator_cpu) >= 4 ? 2 : 0.125)
    )
    error_message = "aggregator_cpu does not fit aggregator_memory: above 4 GiB Cloud Run needs >= 2 vCPUs, above 8 GiB >= 4, above 16 GiB >= 6, above 24 GiB 8 (at most 32 GiB); 4 vCPUs need >= 2 GiB, 6 or 8 need >= 4 GiB; at least 128 MiB."
  }
}

variable "timeout_seconds" {
  description = "Request timeout of every function, in seconds (HTTP functions allow up to 3600)."
  type        = number
  default     = 540

  validation {
    condition     = var.timeout_seconds >= 1 && var.timeout_seconds <= 3600 && floor(var.timeout_seconds) == var.timeout_seconds
    error_message = "timeout_seconds must be a whole number from 1 to 3600."
  }
}

variable "max_instances" {
  description = "Maximum instances of each aggregator (isolated client functions always run one instance: a client is one node, served one request at a time; pools: pool_max_instances)."
  type        = number
  default     = 1

  validation {
    condition     = var.max_instances >= 1 && var.max_instances <= 100 && floor(var.max_instances) == var.max_instances
    error_message = "max_instances must be a whole number from 1 to 100."
  }
}

variable "max_request_bytes" {
  description = "Largest request body a function accepts (FLWR_KD_MAX_BODY_BYTES); larger arrays travel through the bucket. Cloud Run caps HTTP/1 requests at 32 MiB."
  type        = number
  default     = 33554432

  validation {
    condition     = var.max_request_bytes >= 1048576 && var.max_request_bytes <= 33554432 && floor(var.max_request_bytes) == var.max_request_bytes
    error_message = "max_request_bytes must be a whole number of bytes from 1 MiB (1048576) to 32 MiB (33554432)."
  }
}

variable "retention_days" {
  description = "Days after which run arrays (objects under runs/) are deleted by the bucket's lifecycle rule."
  type        = number
  default     = 14

  validation {
    condition     = var.retention_days >= 1 && var.retention_days <= 3650 && floor(var.retention_days) == var.retention_days
    error_message = "retention_days must be a whole number from 1 to 3650."
  }
}

variable "log_retention_days" {
  description = "Days the Cloud Storage access logs are kept (with access_logging)."
  type        = number
  default     = 90

  validation {
    condition     = var.log_retention_days >= 1 && var.log_retention_days <= 3650 && floor(var.log_retention_days) == var.log_retention_days
    error_message = "log_retention_days must be a whole number from 1 to 3650."
  }
}

variable "access_logging" {
  description = <<-EOT
    Write Cloud Storage usage logs of the arrays and sources buckets into a logs bucket. Off by
    default: Cloud Storage writes them as the Google group cloud-storage-analytics@google.com,
    which must be granted roles/storage.objectCreator on the logs bucket, and that grant fails
    under the domain-restricted-sharing organisation policy (iam.allowedPolicyMemberDomains),
    enforced by default in organisations created since May 3, 2024. Google recommends Cloud
    Audit Logs (Data Access logs for storage.googleapis.com) for access logging in most cases;
    docs/deploy.md says how to turn them on. Turn this on where the policy allows the group.
  EOT
  type        = bool
  default     = false
}

variable "firestore_database" {
  description = "Id of the Firestore (native mode) database this module creates. A dedicated database (not \"(default)\") leaves any existing default database alone and is deleted by terraform destroy."
  type        = string
  default     = "flwr-kd"

  validation {
    condition     = var.firestore_database == "(default)" || can(regex("^[a-z][a-z0-9-]{2,61}[a-z0-9]$", var.firestore_database))
    error_message = "firestore_database must be \"(default)\" or 4-63 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "firestore_location" {
  description = "Location of the Firestore database; null means `region`."
  type        = string
  default     = null
}

variable "firestore_deletion_protection" {
  description = "Turn on Firestore delete protection (terraform destroy then keeps failing until it is turned off)."
  type        = bool
  default     = false
}

variable "ingress_settings" {
  description = "Ingress of every function. ALLOW_ALL lets a driver outside Google Cloud reach the functions; only the driver's service account may invoke them either way. ALLOW_INTERNAL_ONLY suits a driver on a VM in the project's VPC."
  type        = string
  default     = "ALLOW_ALL"

  validation {
    condition     = contains(["ALLOW_ALL", "ALLOW_INTERNAL_ONLY", "ALLOW_INTERNAL_AND_GCLB"], var.ingress_settings)
    error_message = "ingress_settings must be ALLOW_ALL, ALLOW_INTERNAL_ONLY or ALLOW_INTERNAL_AND_GCLB."
  }
}

variable "verify_tokens" {
  description = "Functions also verify the caller's Google ID token themselves and accept only the driver's service account (FLWR_KD_VERIFY_TOKENS, FLWR_KD_INVOKER), on top of Cloud Run's IAM check."
  type        = bool
  default     = true
}

variable "driver_impersonators" {
  description = "Principals (user:, group: or serviceAccount:) allowed to act as the driver's service account, e.g. to run `flwr-kd cloud run` with impersonated credentials."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for m in var.driver_impersonators : can(regex("^(user|group|serviceAccount):[^@\\s]+@[^@\\s]+$", m))])
    error_message = "Each driver_impersonators entry must be user:EMAIL, group:EMAIL or serviceAccount:EMAIL (no public or domain-wide members)."
  }
}

variable "enable_apis" {
  description = "Enable the Google Cloud APIs the runtime needs (they stay enabled after terraform destroy)."
  type        = bool
  default     = true
}

variable "force_destroy" {
  description = "Let terraform destroy delete non-empty buckets (apply with it set first, then destroy)."
  type        = bool
  default     = false
}

variable "labels" {
  description = "Extra labels on every labelled resource."
  type        = map(string)
  default     = {}
}
