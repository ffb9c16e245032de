package ferry

import scala.reflect.ClassTag

import org.apache.spark.{Dependency, OneToOneDependency, Partition, SparkContext, TaskContext}
import org.apache.spark.rdd.RDD
import org.apache.spark.sql.execution.SQLExecution

/**
 * An RDD whose lineage is built by `build` when a job first asks for its partitions, not when
 * the RDD is created.
 *
 * A transformer that runs a stage over `dataset.queryExecution.toRdd` would otherwise execute
 * the dataset's shuffles inside `transform`: under adaptive query execution, building that RDD
 * runs every shuffle stage of the plan (to choose the final plan from their sizes). Deferred, a
 * `transform` only plans; the first action builds the lineage and runs it, once (later actions
 * reuse it, as they would an eagerly built RDD).
 *
 * Spark asks for an RDD's partitions on the thread that submits a job (or builds a shuffle over
 * it) before the scheduler walks its dependencies, so `build` runs there, never on the
 * scheduler's event loop. It runs without the submitting query's SQL execution id: the jobs it
 * starts belong to the built query, as they would have at `transform`.
 */
private[ferry] final class DeferredRDD[T: ClassTag](context: SparkContext, @transient build: () => RDD[T])
  extends RDD[T](context, Nil) {

  @transient private lazy val built: RDD[T] = {
    val key = SQLExecution.EXECUTION_ID_KEY
    // `sparkContext`, not the constructor's `context`: a field of that would be serialized with tasks.
    val outer = sparkContext.getLocalProperty(key)
    sparkContext.setLocalProperty(key, null)
    try build()
    finally sparkContext.setLocalProperty(key, outer)
  }

  override protected def getPartitions: Array[Partition] = built.partitions

  override protected def getDependencies: Seq[Dependency[_]] = Seq(new OneToOneDependency(built))

  override protected def getPreferredLocations(split: Partition): Seq[String] = built.preferredLocations(split)

  // On an executor `built` is gone (transient): the parent travels in the serialized dependencies.
  override def compute(split: Partition, context: TaskContext): Iterator[T] = firstParent[T].iterator(split, context)
}
