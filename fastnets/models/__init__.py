"""The classic deep-network family, built from fastnets layers (fused conv-bn-act, pooling, LRN,
layer-norm, attention). Where torchvision has the model, the builder takes torchvision's
arguments and has exactly its state_dict keys and shapes, so a torchvision checkpoint loads with
strict=True. Every builder also takes keyword-only `fused` (default True); fused=False builds the
same network from stock torch.nn modules (torchvision's form), with the same state_dict.

    model = fastnets.models.resnet50().eval()
    model.load_state_dict(torchvision_resnet50.state_dict())   # same keys and shapes
"""
from fastnets.models.alexnet import AlexNet, AlexNet2012, alexnet, alexnet_2012
from fastnets.models.densenet import DenseNet, densenet121, densenet161, densenet169, densenet201
from fastnets.models.efficientnet import (EfficientNet, efficientnet_b0, efficientnet_b1, efficientnet_b2,
                                          efficientnet_b3, efficientnet_b4, efficientnet_b5, efficientnet_b6,
                                          efficientnet_b7)
from fastnets.models.googlenet import GoogLeNet, GoogLeNetOutputs, googlenet
from fastnets.models.lstm import LSTMClassifier, lstm_classifier
from fastnets.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from fastnets.models.text_transformer import TextTransformerClassifier, text_transformer
from fastnets.models.vgg import VGG, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn
from fastnets.models.vit import VisionTransformer, vit_b_16
from fastnets.models.zfnet import ZFNet, zfnet

# The builders that mirror a torchvision builder of the same name (same arguments, same state_dict).
TORCHVISION_BUILDERS = {
    "alexnet": alexnet, "vgg11": vgg11, "vgg11_bn": vgg11_bn, "vgg13": vgg13, "vgg13_bn": vgg13_bn,
    "vgg16": vgg16, "vgg16_bn": vgg16_bn, "vgg19": vgg19, "vgg19_bn": vgg19_bn, "googlenet": googlenet,
    "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101,
    "resnet152": resnet152, "densenet121": densenet121, "densenet161": densenet161, "densenet169": densenet169,
    "densenet201": densenet201, "efficientnet_b0": efficientnet_b0, "efficientnet_b1": efficientnet_b1,
    "efficientnet_b2": efficientnet_b2, "efficientnet_b3": efficientnet_b3, "efficientnet_b4": efficientnet_b4,
    "efficientnet_b5": efficientnet_b5, "efficientnet_b6": efficientnet_b6, "efficientnet_b7": efficientnet_b7,
    "vit_b_16": vit_b_16,
}
# Every builder of the family.
BUILDERS = {**TORCHVISION_BUILDERS, "alexnet_2012": alexnet_2012, "zfnet": zfnet,
            "text_transformer": text_transformer, "lstm_classifier": lstm_classifier}

__all__ = sorted(BUILDERS) + ["AlexNet", "AlexNet2012", "DenseNet", "EfficientNet", "GoogLeNet", "GoogLeNetOutputs",
                              "LSTMClassifier", "ResNet", "TextTransformerClassifier", "VGG", "VisionTransformer",
                              "ZFNet", "BUILDERS", "TORCHVISION_BUILDERS"]
