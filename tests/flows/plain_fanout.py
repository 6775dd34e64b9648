"""A flow that has never heard of pf-metaflow: a foreach and a plain join."""

from metaflow import FlowSpec, Parameter, step


class PlainFanoutFlow(FlowSpec):
    fail_item = Parameter("fail_item", default=-1, type=int)

    @step
    def start(self):
        self.items = [1, 2, 3, 4]
        self.next(self.work, foreach="items")

    @step
    def work(self):
        if self.input == self.fail_item:
            raise RuntimeError(f"item {self.input} failed")
        self.doubled = self.input * 2
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.doubled for i in inputs)
        self.merge_artifacts(inputs, exclude=["doubled"])
        self.next(self.end)

    @step
    def end(self):
        print("total", self.total)


if __name__ == "__main__":
    PlainFanoutFlow()
