"""Long-document question answering (Qwen-Agent style): see docqa.py."""

from qwen2.agent.docqa import Answer, DocQA, Evidence

__all__ = ["Answer", "DocQA", "Evidence"]
