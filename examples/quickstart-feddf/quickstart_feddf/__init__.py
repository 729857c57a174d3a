"""quickstart-feddf: FedDF across ResNet, MobileNetV3 and ViT clients, as a Flower app."""
