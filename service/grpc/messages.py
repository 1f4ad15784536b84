"""The protocol's message classes, built from the compiled ``grpc_service.proto``.

``grpc_service.binpb`` is the descriptor set ``make proto`` compiles from the ``.proto`` beside
it. It is loaded into a descriptor pool of its own rather than protobuf's default one: a client
library with its own copy of the protocol (tritonclient registers the same ``inference.*``
names) can then live in the same process. No generated code, hence no protobuf gencode version
to match at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO = Path(__file__).with_name("grpc_service.proto")
DESCRIPTOR_SET = Path(__file__).with_name("grpc_service.binpb")
PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"

_files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
POOL = descriptor_pool.DescriptorPool()
for _file in _files.file:
    POOL.Add(_file)
SERVICE_DESCRIPTOR = POOL.FindServiceByName(SERVICE)


def message(name: str) -> Any:
    """The class of ``inference.<name>`` (nested names with dots)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ServerLiveResponse = message("ServerLiveResponse")
ServerReadyResponse = message("ServerReadyResponse")
ModelReadyResponse = message("ModelReadyResponse")
ServerMetadataResponse = message("ServerMetadataResponse")
ModelMetadataResponse = message("ModelMetadataResponse")
ModelInferRequest = message("ModelInferRequest")
ModelInferResponse = message("ModelInferResponse")
ModelConfigResponse = message("ModelConfigResponse")
InferParameter = message("InferParameter")
InferTensorContents = message("InferTensorContents")
RepositoryIndexResponse = message("RepositoryIndexResponse")
RepositoryModelLoadResponse = message("RepositoryModelLoadResponse")
RepositoryModelUnloadResponse = message("RepositoryModelUnloadResponse")


def request_class(method: str) -> Any:
    """The request message class of RPC ``method``."""
    return message_factory.GetMessageClass(SERVICE_DESCRIPTOR.FindMethodByName(method).input_type)


def response_class(method: str) -> Any:
    """The response message class of RPC ``method``."""
    return message_factory.GetMessageClass(
        SERVICE_DESCRIPTOR.FindMethodByName(method).output_type
    )
