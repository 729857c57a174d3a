"""quickstart-fedmd: FedMD across ResNet, MobileNetV3 and ViT clients, as a Flower app."""
