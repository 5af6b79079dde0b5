"""The ratings gRPC API, as protobuf messages built from a hand-written descriptor.

The same API as ``ratings.proto`` beside this file (kept for reading and for generating stubs
in other languages); building the descriptor in code avoids a protoc step::

    syntax = "proto3";
    package bookinfo.ratings.v1;
    message GetRatingsRequest { int32 product_id = 1; }
    message PutRatingsRequest { int32 product_id = 1; map<string, int32> ratings = 2; }
    message ProductRatings { int32 id = 1; map<string, int32> ratings = 2; }
    service Ratings {
      rpc GetRatings(GetRatingsRequest) returns (ProductRatings);
      rpc PutRatings(PutRatingsRequest) returns (ProductRatings);
    }

``ProductRatings`` is the JSON of ``GET /ratings/<id>`` (``{"id": 0, "ratings":
{"Reviewer1": 5, "Reviewer2": 4}}``).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = [
    "GET_RATINGS",
    "PUT_RATINGS",
    "SERVICE",
    "GetRatingsRequest",
    "ProductRatings",
    "PutRatingsRequest",
]

PACKAGE = "bookinfo.ratings.v1"
SERVICE = f"{PACKAGE}.Ratings"
GET_RATINGS = f"/{SERVICE}/GetRatings"
PUT_RATINGS = f"/{SERVICE}/PutRatings"

_F = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(
        name="bookinfo/ratings/v1/ratings.proto", package=PACKAGE, syntax="proto3"
    )

    def message(name: str, with_map: bool, first: str) -> None:
        m = f.message_type.add(name=name)
        m.field.add(name=first, number=1, type=_F.TYPE_INT32, label=_F.LABEL_OPTIONAL)
        if with_map:
            entry = m.nested_type.add(name="RatingsEntry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
            entry.field.add(name="value", number=2, type=_F.TYPE_INT32, label=_F.LABEL_OPTIONAL)
            m.field.add(
                name="ratings",
                number=2,
                type=_F.TYPE_MESSAGE,
                label=_F.LABEL_REPEATED,
                type_name=f".{PACKAGE}.{name}.RatingsEntry",
            )

    message("GetRatingsRequest", False, "product_id")
    message("PutRatingsRequest", True, "product_id")
    message("ProductRatings", True, "id")
    service = f.service.add(name="Ratings")
    service.method.add(
        name="GetRatings",
        input_type=f".{PACKAGE}.GetRatingsRequest",
        output_type=f".{PACKAGE}.ProductRatings",
    )
    service.method.add(
        name="PutRatings",
        input_type=f".{PACKAGE}.PutRatingsRequest",
        output_type=f".{PACKAGE}.ProductRatings",
    )
    return f


_pool = descriptor_pool.DescriptorPool()
_pool.Add(_file())


def _cls(name: str) -> Any:
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))


GetRatingsRequest: Any = _cls("GetRatingsRequest")
PutRatingsRequest: Any = _cls("PutRatingsRequest")
ProductRatings: Any = _cls("ProductRatings")
