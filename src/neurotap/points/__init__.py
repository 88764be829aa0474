"""Points: where values can be tapped, how they are named, and the inventory."""

from .attach import Attachment, Frame, first_parameter
from .inventory import Inventory, static_inventory, take_inventory
from .pattern import expand, in_execution_order, is_pattern, matching, ordered_names, unknown_point
from .point import Point, PointList, split_narrowing
from .rewrite import reset_helper_frames

__all__ = [
    "Attachment",
    "Frame",
    "Inventory",
    "Point",
    "PointList",
    "expand",
    "first_parameter",
    "in_execution_order",
    "is_pattern",
    "matching",
    "ordered_names",
    "reset_helper_frames",
    "split_narrowing",
    "static_inventory",
    "take_inventory",
    "unknown_point",
]
